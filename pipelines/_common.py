"""What every kubellm pipeline shares: compile-time settings applied from the run config.

One helper, :func:`configure`, gives a task its display name, retry policy, caching choice and — when
compiling for a cluster — its Kubernetes placement (image, resources, accelerators, node selector,
tolerations, PVCs, secrets, pull secrets, timeout, labels, security context) with kfp-kubernetes.
Locally the placement is skipped: KFP's local runner ignores kfp-kubernetes settings anyway, and the
runtime image is the current Python environment.

Caching is off for every task, deliberately: each task either reads mutable state outside its inputs
(data sources, the Model Registry, the cluster) or logs into this pipeline run's MLflow parent run
(whose id is one of its inputs, so a cache hit could never happen and would leave a hole in the run's
history). Unchanged data is instead detected by fingerprint (``llm-continuous-finetune``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kfp import dsl, kubernetes

from kubellm.config import RunConfig
from kubellm.config.params import to_param
from kubellm.k8s.security import RUNTIME_GID, RUNTIME_UID, WRITABLE_PATHS
from kubellm.k8s.training_job import SHARED_MOUNT

Target = Literal["local", "cluster"]

#: Retries per stage: (count, first backoff). Training and deployment wait longer between tries
#: (a preempted node, a slow rollout); the rest retry quickly.
RETRIES: dict[str, tuple[int, str]] = {
    "train": (3, "60s"),
    "deploy": (3, "30s"),
    "default": (2, "5s"),
}

#: Where the cluster's pods keep the fallback working directory (an emptyDir; tracking goes to the
#: MLflow server named in the config, never to this directory).
CLUSTER_WORKDIR = "/tmp/kubellm"


#: The Kubeflow UI shows these descriptions beside each run parameter.
PARAM_DOCS = {
    "run_name": "Name of the MLflow parent run.",
    "base_model": "Model to adapt: a model directory, models:/name@alias, or a Hugging Face Hub id.",
    "dataset_uri": "Pretraining corpus: a path or glob, hf://owner/name, s3://…, gs://…, https://… or builtin://stdlib.",
    "instruct_dataset_uri": "Instruction data: a path or glob, hf://owner/name, s3://… or builtin://stdlib-instruct.",
    "trials": 'One item per fine-tune: {"name": "trial-1", "overrides": {"lora.r": 16, "optim.lr": 0.0005}}.',
    "metric": "Evaluation metric that ranks the trials that passed the gate.",
    "mode": '"min" (lower is better, e.g. perplexity) or "max" (e.g. rouge_l).',
    "deploy_config": "Rollout, predictor and playground settings (kubellm ReleaseConfig: deploy, serve, playground).",
    "data_config": "Data preparation of the pretraining corpus (kubellm DataConfig).",
    "instruct_data_config": "Data preparation of the instruction data (kubellm DataConfig, kind instruct).",
    "pretrain_config": "Model size, optimizer and training loop (kubellm PretrainConfig).",
    "finetune_config": "LoRA settings, optimizer and training loop (kubellm FinetuneConfig).",
    "eval_config": "Evaluation settings and the promotion gate (kubellm EvalConfig).",
}


def pipeline(name: str, description: str) -> Callable[[Callable[..., None]], Any]:
    """``@dsl.pipeline`` with the parameter descriptions filled in from :data:`PARAM_DOCS`."""

    def wrap(func: Callable[..., None]) -> Any:
        args = "\n".join(f"    {p}: {PARAM_DOCS[p]}" for p in inspect.signature(func).parameters)
        func.__doc__ = f"{description}\n\nArgs:\n{args}\n"
        return dsl.pipeline(name=name, description=description)(func)

    return wrap


@dataclass(frozen=True)
class Context:
    """A pipeline build: the validated config, the target, and the constants derived from them."""

    cfg: RunConfig
    target: Target

    @property
    def workdir(self) -> str:
        if self.target == "cluster":
            return CLUSTER_WORKDIR
        return str(Path(self.cfg.workdir).resolve())

    @property
    def tracking(self) -> dict[str, Any]:
        """The tracking section as a task argument; locally with the sqlite URI made absolute, so every
        task process (whatever its working directory) writes to the same store."""
        t = self.cfg.tracking.model_copy()
        if self.target == "local" and t.enabled and t.uri is None:
            import os

            t.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(self.workdir) / 'mlflow.db'}"
        return to_param(t)

    def placed(self) -> dict[str, Any]:
        """Arguments of a step that acts beyond its pod (training jobs, the rollout): the compile-time
        ``platform`` section and the config's name (it names Kubernetes objects), as constants — the
        Kubeflow UI does not offer them as run parameters, since they also shape the compiled graph."""
        return {"platform": to_param(self.cfg.platform), "run_name": self.cfg.name}

    @contextlib.contextmanager
    def tracked(self, pipeline_name: str, run_name: Any) -> Iterator[Any]:
        """The MLflow parent run around a pipeline's tasks: the exit handler records the final state,
        the first task starts the run. Yields the start task (its output is the parent run id)."""
        from kubellm.components import tracking

        ids = {"pipeline_name": pipeline_name, "run_name": run_name, "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        exit_task = self.configure(tracking.finish_run(tracking=self.tracking, workdir=self.workdir, **ids),
                                   "register", "Record final status in MLflow")
        with dsl.ExitHandler(exit_task, name=pipeline_name.removeprefix("llm-")):
            yield self.configure(tracking.start_run(run_config=to_param(self.cfg), tracking=self.tracking,
                                                    workdir=self.workdir, **ids), "register", "Start MLflow run")

    def stage_args(self, start: Any) -> dict[str, Any]:
        """The arguments every stage component takes: where and under which parent run to log."""
        return {"tracking": self.tracking, "workdir": self.workdir, "parent_run_id": start.output}

    def configure(self, task: Any, stage: str, display_name: str, retry: str = "default") -> Any:
        """Display name, retries, caching and (on a cluster) placement for one task."""
        task.set_display_name(display_name)
        count, backoff = RETRIES[retry]
        if self.target == "local":
            backoff = "1s"  # the waits are for a cluster (preempted nodes, slow rollouts), not a laptop
        task.set_retry(num_retries=count, backoff_duration=backoff, backoff_factor=2.0,
                       backoff_max_duration="3600s")
        task.set_caching_options(False)
        if self.target == "cluster":
            apply_placement(task, stage, self.cfg)
        return task


def apply_placement(task: Any, stage: str, cfg: RunConfig) -> Any:
    """Apply ``platform`` settings for ``stage`` to a task with kfp-kubernetes (compile time)."""
    platform = cfg.platform
    place = platform.placement(stage)
    res = place.resources
    task.set_container_image(platform.image)
    if res.cpu_request:
        task.set_cpu_request(res.cpu_request)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_request:
        task.set_memory_request(res.memory_request)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)
    if res.gpus:
        task.set_accelerator_type("nvidia.com/gpu")
        task.set_accelerator_limit(res.gpus)
    if res.accelerator:
        kubernetes.add_node_selector(task, label_key="cloud.google.com/gke-accelerator", label_value=res.accelerator)
    for key, value in sorted(place.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in place.tolerations:
        kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
    for pvc in place.pvcs:
        kubernetes.mount_pvc(task, pvc_name=pvc.claim, mount_path=pvc.mount_path)
    dist = platform.distributed_for(stage) if stage in ("pretrain", "finetune") else None
    if dist is not None and dist.engine != "none" and all(p.mount_path != SHARED_MOUNT for p in place.pvcs):
        # The step copies its inputs to, and its output from, the PVC the training job's pods share.
        kubernetes.mount_pvc(task, pvc_name=dist.shared_pvc, mount_path=SHARED_MOUNT)
    for sec in place.secret_env:
        kubernetes.use_secret_as_env(task, secret_name=sec.secret, secret_key_to_env={sec.key: sec.env})
    for sec in place.secret_volumes:
        kubernetes.use_secret_as_volume(task, secret_name=sec.secret, mount_path=sec.mount_path)
    if platform.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(platform.image_pull_secrets))
    if place.timeout_seconds:
        kubernetes.set_timeout(task, place.timeout_seconds)
    labels = {"app.kubernetes.io/part-of": "kubellm", "kubellm.io/stage": stage.replace("_", "-"), **place.labels}
    if dist is not None and dist.engine == "none":
        labels.update(platform.queue_labels())  # the step's own pod trains: Kueue's pod integration admits it
    for key, value in sorted(labels.items()):
        kubernetes.add_pod_label(task, label_key=key, label_value=value)
    for key, value in sorted(place.annotations.items()):
        kubernetes.add_pod_annotation(task, annotation_key=key, annotation_value=value)
    # Non-root numeric user; KFP's compiler adds no-escalation, drop ALL and RuntimeDefault seccomp.
    kubernetes.set_security_context(task, run_as_user=RUNTIME_UID, run_as_group=RUNTIME_GID, run_as_non_root=True)
    for name, path in WRITABLE_PATHS.items():
        kubernetes.empty_dir_mount(task, volume_name=f"kubellm-{name}", mount_path=path, size_limit="8Gi")
    return task


def require(cfg: RunConfig, *sections: str) -> RunConfig:
    """Fail before compiling when the config lacks a section this pipeline needs."""
    from kubellm.errors import ConfigError

    missing = [s for s in sections if getattr(cfg, s) is None]
    if missing:
        raise ConfigError(f"the run config has no {', '.join(missing)} section(s), which this pipeline needs")
    return cfg
