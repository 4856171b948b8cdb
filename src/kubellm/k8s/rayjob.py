"""KubeRay ``RayJob`` (ray.io/v1): the third training engine, beside PyTorchJob and TrainJob.

A RayJob makes KubeRay create a Ray cluster, submit one entrypoint to it and report the outcome. Ours:

- **Cluster**: a head pod (GCS, dashboard, the Ray Train driver; ``num-cpus: 0`` so no training worker
  lands there, and no GPU) and ``nodes`` worker pods with the stage's placement (resources and GPUs, node
  selector, tolerations, PVCs, secrets), all on ``platform.image`` with the restricted security context,
  a read-only root filesystem (Ray's session directory lives in the ``/tmp`` emptyDir, its object store
  in the memory-backed ``/dev/shm``) and the shared PVC at :data:`~kubellm.k8s.jobspec.SHARED_MOUNT`.
  KubeRay writes the containers' ``ray start`` command itself; Ray's token authentication is on
  (``authOptions.mode: token``: KubeRay keeps the token in a Secret and hands it to every Ray process).
- **Entrypoint**: ``python -m kubellm.stages.ray_train <stage> --workers N --gpus-per-worker 1 …`` with the
  run config inline as ``--set`` arguments (as in the other engines): a ``TorchTrainer`` with one worker
  per GPU runs kubellm's own loop, checkpointing on the shared PVC, so a resubmitted job resumes.
- **Submission**: ``HTTPMode``: the operator submits through the head's dashboard API. The default
  ``K8sJobMode`` adds a submitter pod built by the operator, whose security context cannot be set here
  short of a full ``submitterPodTemplate`` and which ``restricted`` namespaces reject.
- **Clean-up**: ``shutdownAfterJobFinishes`` deletes the Ray cluster ``ttl_seconds_after_finished`` after
  the job ends (the RayJob object and its status stay); ``activeDeadlineSeconds`` is the step's timeout,
  so no cluster holds GPUs after the step stopped waiting.

The same Ray cluster on CPU workers prepares data: :func:`build_prep_rayjob` runs ``kubellm prep`` on Ray
Data as its entrypoint, and :func:`kubellm.k8s.training_job.run_prep_rayjob` is the one launcher of ``kubellm prep``
and of the
pipeline's prep steps (:func:`kubellm.stages.data.prep`).

The outcome is read from ``status.jobDeploymentStatus`` (``Complete``/``Failed``…) and ``jobStatus``
(Ray's own: ``SUCCEEDED``/``FAILED``/``STOPPED``), with ``reason`` and ``message``; KubeRay before 1.2
reports ``Complete`` for a failed job too, so success needs both. Launching, re-attaching and the
timeout are :func:`kubellm.k8s.training_job.launch`'s, the same for every engine.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from kubellm.config.platform import DistributedConfig, Placement
from kubellm.config.run import RunConfig
from kubellm.errors import ConfigError
from kubellm.k8s import pods
from kubellm.k8s.jobspec import (
    GRACE_SECONDS,
    add_container_env,
    job_labels,
    job_name,
    job_object,
    job_placement,
    set_args,
    shared_path,
    shared_volume,
)

API = {"group": "ray.io", "version": "v1", "kind": "RayJob", "plural": "rayjobs"}

#: Ray in the runtime image (``kubellm[ray]``); KubeRay reads it to pick compatible defaults.
RAY_VERSION = "2.60.0"
#: The Ray Train entry (the only module that imports ray).
ENTRY_MODULE = "kubellm.stages.ray_train"
HEAD_CONTAINER = "ray-head"
WORKER_CONTAINER = "ray-worker"
WORKER_GROUP = "workers"
#: No usage reports from the cluster (Ray sends them by default).
RAY_ENV = {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
#: ``jobDeploymentStatus`` values after which KubeRay does nothing more.
_FAILED_DEPLOYMENT = ("Failed", "ValidationFailed")


def spec(
    run_cfg: RunConfig, stage: str, dist: DistributedConfig, placement: Placement, argv: list[str]
) -> dict[str, Any]:
    """The RayJob ``spec``: Ray cluster, entrypoint and lifecycle (see the module docstring)."""
    gpus = placement.resources.gpus
    if gpus and dist.procs_per_node > gpus:
        raise ConfigError(
            f"platform.distributed.{stage}.procs_per_node ({dist.procs_per_node}) exceeds the "
            f"{gpus} GPU(s) per pod of the {stage} placement: Ray Train places one worker per "
            f"GPU, so the extra workers would never be scheduled"
        )
    volume, mount = shared_volume(dist)
    labels = job_labels(run_cfg, stage)
    # The head runs no training worker: no GPU and no accelerator label to wait for.
    head_placement = placement.model_copy(
        update={"resources": placement.resources.model_copy(update={"gpus": 0, "accelerator": None})}
    )

    def template(name: str, where: Placement) -> dict[str, Any]:
        container = pods.container(name, run_cfg.platform.image, where, env=RAY_ENV, mounts=[mount], working_dir="/tmp")
        return {
            "metadata": pods.pod_metadata(where, labels),
            "spec": pods.pod_spec(
                [container], where, run_cfg.platform, extra_volumes=[volume], termination_grace_s=GRACE_SECONDS
            ),
        }

    return {
        "entrypoint": entrypoint(stage, dist, gpus, argv),
        "submissionMode": "HTTPMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": dist.ttl_seconds_after_finished,
        "activeDeadlineSeconds": dist.timeout_seconds,
        "rayClusterSpec": {
            "rayVersion": RAY_VERSION,
            "authOptions": {"mode": "token"},
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                "template": template(HEAD_CONTAINER, head_placement),
            },
            "workerGroupSpecs": [
                {
                    "groupName": WORKER_GROUP,
                    "replicas": dist.nodes,
                    "minReplicas": dist.nodes,
                    "maxReplicas": dist.nodes,
                    "rayStartParams": {},
                    "template": template(WORKER_CONTAINER, placement),
                }
            ],
        },
    }


def entrypoint(stage: str, dist: DistributedConfig, gpus: int, argv: list[str]) -> str:
    """The shell command KubeRay submits: the Ray Train driver with ``nodes × procs_per_node`` workers."""
    return shlex.join(
        [
            "python",
            "-m",
            ENTRY_MODULE,
            stage,
            "--workers",
            str(dist.nodes * dist.procs_per_node),
            "--gpus-per-worker",
            "1" if gpus else "0",
            "--max-failures",
            str(dist.backoff_limit),
            *argv,
        ]
    )


def state(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``("succeeded" | "failed" | "running", reason)`` from a RayJob's status."""
    status = obj.get("status") or {}
    deployment, job = status.get("jobDeploymentStatus"), status.get("jobStatus")
    if deployment in _FAILED_DEPLOYMENT or (deployment == "Complete" and job != "SUCCEEDED"):
        parts = [status.get("reason"), f"Ray job {job}" if job else None, status.get("message")]
        return "failed", ": ".join(str(p) for p in parts if p) or f"jobDeploymentStatus {deployment}"
    if deployment == "Complete":
        return "succeeded", ""
    return "running", ""


def add_env(job_spec: dict[str, Any], env: Mapping[str, str]) -> None:
    """Add ``env`` to the head's and the workers' containers (the Ray Train driver and workers)."""
    cluster = job_spec["rayClusterSpec"]
    add_container_env(
        [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])], env
    )


def status_lines(obj: Mapping[str, Any]) -> list[str]:
    """The RayJob's current state as one log line (the launcher logs each new one)."""
    status = obj.get("status") or {}
    if not status:
        return []
    line = str(status.get("jobDeploymentStatus") or "New")
    if status.get("jobStatus"):
        line += f" (Ray job {status['jobStatus']})"
    detail = " ".join(str(x) for x in (status.get("reason"), status.get("message")) if x)
    return [f"{line}: {detail}" if detail else line]


# --------------------------------------------------------------------------------------------- data prep
#: The run-config sections a prep RayJob prepares, and the stage whose placement its pods take.
PREP_STAGES = {"data": "prep", "instruct_data": "prep_instruct"}


def build_prep_rayjob(
    run_cfg: RunConfig,
    section: str,
    out_dir: str,
    tokenizer_dir: str | None = None,
    *,
    data_fingerprint: str | None = None,
    run_key: str | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The RayJob in which ``kubellm prep`` prepares ``section`` (``data``/``instruct_data``) on Ray Data.

    The Ray cluster is the training RayJob's (:func:`spec`): a head that runs the driver (``num-cpus:
    0``: no Ray Data task there) and ``<section>.cluster.nodes`` worker pods, with the prep stage's placement,
    the restricted security context, the shared PVC at ``/mnt/kubellm`` and Kueue's queue labels on the job.
    The entrypoint is ``kubellm prep`` with the run's sections inline (``--set``, as for training) and
    ``cluster.nodes=0``, so the driver prepares in place on the cluster it runs in (``RAY_ADDRESS``), and
    MLflow is written from the driver. ``out_dir`` and ``tokenizer_dir`` are paths on the shared PVC. The
    name is a hash of the spec, ``data_fingerprint`` and ``run_key`` (the pipeline step passes its KFP run
    id: a retried step re-attaches to its job, the next pipeline run gets a job of its own, whose prep
    re-uses every shard that still verifies), so a resubmitted job after a failure resumes from the shards
    already on the PVC. ``env`` reaches the driver and the workers (the step's MLflow run, the client's
    settings) without taking part in the name.
    """
    if section not in PREP_STAGES:
        raise ConfigError(f"prep section {section!r}: expected one of {sorted(PREP_STAGES)}")
    data = getattr(run_cfg, section, None)
    if data is None or data.engine != "ray" or not data.cluster.nodes:
        raise ConfigError(f"{section}: a prep RayJob needs {section}.engine: ray and {section}.cluster.nodes ≥ 1")
    stage = PREP_STAGES[section]
    cl = data.cluster
    dist = DistributedConfig(
        engine="rayjob",
        nodes=cl.nodes,
        shared_pvc=cl.shared_pvc,
        timeout_seconds=cl.timeout_seconds,
        ttl_seconds_after_finished=cl.ttl_seconds_after_finished,
    )
    placement = job_placement(run_cfg.platform.placement(stage), dist, stage)
    if placement.resources.gpus:
        placement = placement.model_copy(
            update={"resources": placement.resources.model_copy(update={"gpus": 0, "accelerator": None})}
        )  # tokenizing is CPU work
    job_spec = spec(run_cfg, stage, dist, placement, [])
    argv = [
        "kubellm",
        "prep",
        "--out",
        shared_path(out_dir, "out_dir"),
        "--section",
        section,
        *(["--tokenizer", shared_path(tokenizer_dir, "tokenizer_dir")] if tokenizer_dir else []),
        *set_args(run_cfg, section),
        "--set",
        f"{section}.cluster.nodes=0",
    ]
    job_spec["entrypoint"] = shlex.join(argv)
    identity = {
        "kind": "RayJob",
        "spec": job_spec,
        "data": data_fingerprint or argv[3],
        **({"run": run_key} if run_key else {}),
    }
    name = job_name(stage, run_cfg.name, identity)
    if env:
        add_env(job_spec, env)
    return job_object(API, name, run_cfg, stage, job_spec, data_fingerprint)
