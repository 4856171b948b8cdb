"""Kubeflow Trainer ``TrainJob`` (trainer.kubeflow.org/v1alpha1): one of the three training engines.

The job names a ``ClusterTrainingRuntime`` (``platform.distributed.<stage>.runtime``) and sets the trainer
(image, ``torchrun`` command, arguments, env, nodes, processes and resources per node); what the runtime's
pods need beyond that (security context, the shared PVC, node selector, tolerations, grace period) goes
in a ``runtimePatches`` entry of ours, restricted to the fields its CRD allows. The operator reports the
outcome as ``Complete``/``Failed`` conditions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubellm.config.platform import DistributedConfig, Placement
from kubellm.config.run import RunConfig
from kubellm.k8s import pods
from kubellm.k8s.jobspec import (
    GRACE_SECONDS,
    condition_lines,
    condition_state,
    env_entries,
    job_labels,
    shared_volume,
    torchrun_command,
)

API = {"group": "trainer.kubeflow.org", "version": "v1alpha1", "kind": "TrainJob", "plural": "trainjobs"}
#: Replicated job and container name in Kubeflow Trainer's torch runtimes (``torch-distributed``).
TRAINJOB_NODE = "node"
#: Identifies our entry in a TrainJob's ``runtimePatches`` (the list is keyed by manager).
PATCH_MANAGER = "kubellm.io/launcher"
#: Pod-spec and container fields a TrainJob runtime patch may set (its CRD allows no others).
_PATCH_POD_FIELDS = (
    "serviceAccountName",
    "securityContext",
    "containers",
    "volumes",
    "nodeSelector",
    "tolerations",
    "imagePullSecrets",
    "terminationGracePeriodSeconds",
)
_PATCH_CONTAINER_FIELDS = ("name", "securityContext", "volumeMounts")


def spec(
    run_cfg: RunConfig, stage: str, dist: DistributedConfig, placement: Placement, argv: list[str]
) -> dict[str, Any]:
    """The TrainJob ``spec`` that runs ``kubellm <stage> <argv>`` under torchrun on every node."""
    volume, mount = shared_volume(dist)
    full = pods.container(
        TRAINJOB_NODE, run_cfg.platform.image, placement, env={"PYTHONUNBUFFERED": "1"}, mounts=[mount]
    )
    pod = pods.pod_spec([full], placement, run_cfg.platform, extra_volumes=[volume], termination_grace_s=GRACE_SECONDS)
    pod["containers"] = [{k: full[k] for k in _PATCH_CONTAINER_FIELDS}]
    pod_patch = {k: pod[k] for k in _PATCH_POD_FIELDS if k in pod}
    trainer: dict[str, Any] = {
        "image": run_cfg.platform.image,
        "command": torchrun_command(stage, dist),
        "args": argv,
        "env": full["env"],
        "numNodes": dist.nodes,
        "numProcPerNode": dist.procs_per_node,
    }
    if "resources" in full:
        trainer["resourcesPerNode"] = full["resources"]
    return {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": dist.runtime},
        "activeDeadlineSeconds": dist.timeout_seconds,
        "trainer": trainer,
        "runtimePatches": [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": TRAINJOB_NODE,
                                    "template": {
                                        "spec": {
                                            "template": {
                                                "metadata": pods.pod_metadata(placement, job_labels(run_cfg, stage)),
                                                "spec": pod_patch,
                                            }
                                        }
                                    },
                                }
                            ]
                        }
                    }
                },
            }
        ],
    }


def add_env(job_spec: dict[str, Any], env: Mapping[str, str]) -> None:
    """Add ``env`` to the trainer (the runtime passes it to every node)."""
    job_spec["trainer"]["env"] += env_entries(env)


def state(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``("succeeded" | "failed" | "running", reason)`` from the job's conditions."""
    return condition_state(obj, "Complete")


status_lines = condition_lines
