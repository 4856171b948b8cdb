"""Kubeflow training-operator ``PyTorchJob`` (kubeflow.org/v1): one of the three training engines.

Every pod runs ``torchrun --no-python kubellm pretrain|finetune …`` (:func:`~kubellm.k8s.jobspec.torchrun_command`)
in the container the operator injects its rendezvous env and port into; a fixed-size job has a Master and
``nodes - 1`` Workers, an elastic one (``min_nodes``/``max_nodes``) Workers only with c10d rendezvous.
The operator reports the outcome as ``Succeeded``/``Failed`` conditions.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from kubellm.config.platform import DistributedConfig, Placement
from kubellm.config.run import RunConfig
from kubellm.k8s import pods
from kubellm.k8s.jobspec import (
    GRACE_SECONDS,
    add_container_env,
    condition_lines,
    condition_state,
    job_labels,
    shared_volume,
    torchrun_command,
)

API = {"group": "kubeflow.org", "version": "v1", "kind": "PyTorchJob", "plural": "pytorchjobs"}
#: The training operator injects its env and port into the container of this name.
PYTORCH_CONTAINER = "pytorch"


def spec(
    run_cfg: RunConfig, stage: str, dist: DistributedConfig, placement: Placement, argv: list[str]
) -> dict[str, Any]:
    """The PyTorchJob ``spec`` that runs ``kubellm <stage> <argv>`` under torchrun on every pod."""
    volume, mount = shared_volume(dist)
    container = pods.container(
        PYTORCH_CONTAINER,
        run_cfg.platform.image,
        placement,
        command=torchrun_command(stage, dist),
        args=argv,
        env={"PYTHONUNBUFFERED": "1"},
        mounts=[mount],
        working_dir="/tmp",
    )
    template = {
        "metadata": pods.pod_metadata(placement, job_labels(run_cfg, stage)),
        "spec": pods.pod_spec(
            [container], placement, run_cfg.platform, extra_volumes=[volume], termination_grace_s=GRACE_SECONDS
        ),
    }
    elastic = bool(dist.min_nodes or dist.max_nodes)

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": dist.restart_policy, "template": copy.deepcopy(template)}

    out: dict[str, Any] = {
        "nprocPerNode": str(dist.procs_per_node),
        "runPolicy": {
            "backoffLimit": dist.backoff_limit,
            # The operator stops the job when the step stops waiting: no orphan holds GPUs after a
            # timeout, and a retried step replaces the failed job and resumes from the checkpoint.
            "activeDeadlineSeconds": dist.timeout_seconds,
            "cleanPodPolicy": "Running",
        },
    }
    if elastic:
        # Elastic jobs have Workers only; c10d rendezvous runs in the first worker.
        out["elasticPolicy"] = {
            "minReplicas": dist.min_nodes or dist.nodes,
            "maxReplicas": dist.max_nodes or dist.nodes,
            "maxRestarts": dist.backoff_limit,
            "rdzvBackend": "c10d",
        }
        out["pytorchReplicaSpecs"] = {"Worker": replica(dist.nodes)}
    else:
        out["pytorchReplicaSpecs"] = {"Master": replica(1)}
        if dist.nodes > 1:
            out["pytorchReplicaSpecs"]["Worker"] = replica(dist.nodes - 1)
    return out


def add_env(job_spec: dict[str, Any], env: Mapping[str, str]) -> None:
    """Add ``env`` to every replica's container."""
    add_container_env((r["template"] for r in job_spec["pytorchReplicaSpecs"].values()), env)


def state(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``("succeeded" | "failed" | "running", reason)`` from the job's conditions."""
    return condition_state(obj, "Succeeded")


status_lines = condition_lines
