"""What every kubellm pipeline shares: compile-time settings applied from the run config.

One helper, :meth:`Context.configure`, gives a task its display name, retry policy, caching choice and —
when compiling for a cluster — its Kubernetes placement (image, resources, accelerators, node selector,
tolerations, PVCs, secrets, pull secrets, timeout, labels, security context) with kfp-kubernetes.
Locally the placement is skipped: KFP's local runner ignores kfp-kubernetes settings anyway, and the
runtime image is the current Python environment.

The pipelines reach it through :class:`kubellm.pipelines.api.Builder`, which reads each step's
settings from the one table of steps (``api.STEPS``).

Caching: exactly the pure steps are cacheable (``cache=True`` in ``api.STEPS``, pinned by a compile test):
``fetch_model``, ``prepare_data``, ``prepare_instructions``, ``pretrain``, ``finetune`` and ``evaluate``.
Their outputs depend only on their inputs — the stage's config, the source URI or base model reference,
and the input artifacts (a dataset's content carries its data fingerprint) — and none of their inputs is
run-specific: they find the pipeline's MLflow parent run by the KFP run id in their environment
(:data:`kubellm.stages.KFP_RUN_ENV`: the pod's ``pipeline/runid`` label on a cluster, set by
``kubellm run`` locally), not as an input, which would make every cache key unique. Steps with side
effects or mutable inputs never cache: the parent run's start and finish, ``check_data`` (asks the
Model Registry), ``compare_with_champion`` (the champion moves), ``register`` and ``deploy``; nor does
``select_best`` (it only copies). In ``llm-continuous-finetune`` instruction prep is not cached either:
that pipeline exists for data that changes behind the same URI.

A cache hit assumes that a source URI or a base model reference (a directory, ``models:/name/N``, a Hub
id) names unchanged content: reuse is opt-in per run (``kubellm submit --cache`` on a cluster, ``kubellm
run --resume RUN`` locally), and a plain run or a recurring run recomputes every step. A cached step
runs no code, so it leaves no stage run under the new parent run; the original run holds its record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kfp import dsl, kubernetes

from kubellm.config import RunConfig
from kubellm.config.params import to_param
from kubellm.k8s.jobspec import SHARED_MOUNT
from kubellm.k8s.security import RUNTIME_GID, RUNTIME_UID, WRITABLE_PATHS
from kubellm.stages.base import KFP_RUN_ENV

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

#: The label KFP's backend puts on every pod of a run, holding the run's id (equal to
#: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``, which tags the MLflow parent run).
RUN_ID_LABEL = "pipeline/runid"


@dataclass(frozen=True)
class Context:
    """A pipeline build: the validated config, the target, and the constants derived from them."""

    cfg: RunConfig
    target: Target
    run_id: str | None = None
    """Locally, ``kubellm run``'s id for this run (KFP's local runner makes a random one that the tasks
    cannot see): tags the MLflow parent run, as the KFP run id does on a cluster."""
    caching: bool = True
    """Mark the pure steps cacheable; False compiles every step uncached (a run that must recompute)."""

    @property
    def workdir(self) -> str:
        if self.target == "cluster":
            return CLUSTER_WORKDIR
        return str(Path(self.cfg.workdir).resolve())

    @property
    def tracking(self) -> dict[str, Any]:
        """The tracking section as a task argument; locally with the URI resolved (the sqlite store's made
        absolute, so every task process, whatever its working directory, writes to the same store; a
        ``$MLFLOW_TRACKING_URI``'s password moved out of it, as task arguments are shown)."""
        t = self.cfg.tracking.model_copy(update={"register_merged": self.cfg.merged_versions(self.target)})
        if self.target == "local" and t.enabled and t.uri is None:
            from kubellm.tracking import resolve_tracking_uri

            t.uri = resolve_tracking_uri(t, self.workdir)
        return to_param(t)

    def pipeline_config(self) -> Any:
        """KFP's pipeline-level settings from ``platform.run_limits`` (None locally, or with no limit set:
        the compiled pipeline is then exactly as without them)."""
        limits = self.cfg.platform.run_limits
        if self.target != "cluster" or not limits.any():
            return None
        return dsl.PipelineConfig(**limits.model_dump())

    def placed(self) -> dict[str, Any]:
        """Arguments of a step that acts beyond its pod (training jobs, the rollout): the compile-time
        ``platform`` section and the config's name (it names Kubernetes objects), as constants — the
        Kubeflow UI does not offer them as run parameters, since they also shape the compiled graph."""
        return {"platform": to_param(self.cfg.platform), "run_name": self.cfg.name}

    def configure(
        self, task: Any, stage: str, display_name: str, retry: str = "default", *, cache: bool = False
    ) -> Any:
        """Display name, retries, caching (``cache``: a pure step, see the module docstring) and — on a
        cluster — placement and the KFP run id in the environment, for one task."""
        task.set_display_name(display_name)
        count, backoff = RETRIES[retry]
        if self.target == "local":
            backoff = "1s"  # the waits are for a cluster (preempted nodes, slow rollouts), not a laptop
        task.set_retry(num_retries=count, backoff_duration=backoff, backoff_factor=2.0, backoff_max_duration="3600s")
        task.set_caching_options(cache and self.caching)
        if self.target == "cluster":
            apply_placement(task, stage, self.cfg)
            kubernetes.use_field_path_as_env(
                task, env_name=KFP_RUN_ENV, field_path=f"metadata.labels['{RUN_ID_LABEL}']"
            )
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
    shared = cfg.job_shared_pvc(stage)
    if shared and all(p.mount_path != SHARED_MOUNT for p in place.pvcs):
        # The step copies its inputs to, and its output from, the PVC the cluster job's pods share.
        kubernetes.mount_pvc(task, pvc_name=shared, mount_path=SHARED_MOUNT)
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
