"""What every job manifest kubellm builds shares, whatever its kind (PyTorchJob, TrainJob, RayJob).

Every job runs on ``platform.image`` with the restricted security context, the stage's placement
(resources, GPUs, node selector, tolerations, PVCs, secrets) and the shared PVC mounted at
:data:`SHARED_MOUNT`, where the step's own pod mounts it too, so data, checkpoints and the output
directory have the same paths on both sides.

**The run config travels inline**, as ``--set key=value`` arguments (values JSON-encoded, which YAML reads
back exactly), not as a ConfigMap: the job object alone then reproduces the run (``kubectl get -o yaml``
shows every value), its name hash covers the config, nothing else has to be created, owned and garbage
collected, and the pipeline needs no RBAC on ConfigMaps. Only the sections the stage reads are passed
(``name``, ``workdir``, the stage, ``tracking``): ``platform`` stays behind, so inside the job
``platform.distributed`` is the default (train in this process) and no pod launches a job of its own.

The kinds' own manifests are in :mod:`kubellm.k8s.pytorchjob`, :mod:`kubellm.k8s.trainjob` and
:mod:`kubellm.k8s.rayjob`; :mod:`kubellm.k8s.training_job` builds and launches them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

from kubellm.config.platform import DistributedConfig, Placement
from kubellm.config.run import RunConfig
from kubellm.errors import ConfigError

Stage = Literal["pretrain", "finetune"]

#: Where the shared PVC is mounted in the step's pod and in every job pod.
SHARED_MOUNT = "/mnt/kubellm"
SHARED_VOLUME = "shared"
#: Names stay ≤ 40 characters: PyTorchJob pods and Services are ``<job>-worker-<i>`` and JobSet pods
#: ``<job>-node-<i>-<j>-<5 chars>``, all DNS labels of at most 63.
MAX_NAME = 40
#: A SIGTERM'd trainer writes a checkpoint before it exits (LoopConfig.checkpoint_every); a 1 B-parameter
#: model with AdamW state is ~12 GB to a network volume, so give it two minutes, not the default 30 s.
GRACE_SECONDS = 120


def shared_path(path: str, what: str) -> str:
    """``path`` as seen inside the pods: under :data:`SHARED_MOUNT` (relative paths are joined to it)."""
    p = PurePosixPath(path)
    if ".." in p.parts:
        raise ConfigError(f"{what} {path!r}: '..' is not allowed in a path on the shared PVC")
    full = p if p.is_absolute() else PurePosixPath(SHARED_MOUNT) / p
    if full != PurePosixPath(SHARED_MOUNT) and PurePosixPath(SHARED_MOUNT) not in full.parents:
        raise ConfigError(
            f"{what} {path!r}: the job's pods only see the shared PVC at {SHARED_MOUNT}; use a path under it"
        )
    return str(full)


def torchrun_command(stage: str, dist: DistributedConfig) -> list[str]:
    """``torchrun`` with this config's node and process counts; rank and rendezvous come from the
    operator's ``PET_*`` environment (torchrun reads ``PET_<FLAG>`` for every flag)."""
    if dist.min_nodes or dist.max_nodes:
        nnodes = f"{dist.min_nodes or dist.nodes}:{dist.max_nodes or dist.nodes}"
        elastic = [f"--max-restarts={dist.backoff_limit}"]
    else:
        nnodes, elastic = str(dist.nodes), []
    return [
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={dist.procs_per_node}",
        *elastic,
        "--no-python",
        "kubellm",
        stage,
    ]


def job_name(stage: str, run_name: str, identity: Mapping[str, Any]) -> str:
    """``<stage>-<run>-<10 hex>``: the hash of ``identity``; at most :data:`MAX_NAME` characters.

    Starting with the stage keeps it a valid RFC 1035 label (TrainJob names must start with a letter)
    even for a run name such as ``2024-llm``.
    """
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode())
    suffix = digest.hexdigest()[:10]
    room = MAX_NAME - len(stage) - len(suffix) - 2
    run = run_name[:room].rstrip("-")
    return f"{stage}-{run}-{suffix}" if run else f"{stage}-{suffix}"


def set_args(run_cfg: RunConfig, stage: str) -> list[str]:
    """``--set key=value`` for every leaf of the sections ``stage`` reads (see the module docstring)."""
    uri = run_cfg.tracking.uri
    if uri and (urlsplit(uri).username or urlsplit(uri).password):
        raise ConfigError(
            "tracking.uri: credentials in the URI would be stored in the job spec; "
            "give them as platform secret_env MLFLOW_TRACKING_USERNAME/PASSWORD"
        )
    doc = run_cfg.model_dump(mode="json", include={"name", "workdir", stage, "tracking"})
    args: list[str] = []
    for key, value in _leaves(doc):
        args += ["--set", f"{key}={_encode(value)}"]
    return args


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    # Lists and empty mappings are set whole: an override can only index into an existing list.
    if isinstance(node, dict) and node:
        out = []
        for key in sorted(node):
            out += _leaves(node[key], f"{prefix}.{key}" if prefix else key)
        return out
    return [(prefix, node)]


def _encode(value: Any) -> str:
    """JSON, which ``--set`` parses back as YAML to the same value (quoted strings stay strings)."""
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        # YAML 1.1 reads ``3e-05`` as a string: it wants a dot in the mantissa (``3.0e-05``).
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa if '.' in mantissa else mantissa + '.0'}{e}{exponent}" if e else text
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def job_labels(run_cfg: RunConfig, stage: str) -> dict[str, str]:
    """Labels of a training job and of its pods."""
    return {
        "app.kubernetes.io/name": "kubellm",
        "app.kubernetes.io/component": stage,
        "app.kubernetes.io/managed-by": "kubellm",
        "kubellm.io/run": run_cfg.name,
    }


def job_placement(placement: Placement, dist: DistributedConfig, stage: str) -> Placement:
    """The stage's placement without its own mount of the shared PVC (the step's pod mounts it at
    :data:`SHARED_MOUNT` too; the job adds it once); another volume at that path is an error."""
    keep = []
    for pvc in placement.pvcs:
        if pvc.mount_path.rstrip("/") != SHARED_MOUNT:
            keep.append(pvc)
        elif pvc.claim != dist.shared_pvc:
            raise ConfigError(
                f"platform placement of {stage}: PVC {pvc.claim!r} is mounted at {SHARED_MOUNT}, "
                f"where the job mounts platform.distributed.{stage}.shared_pvc {dist.shared_pvc!r}"
            )
    return placement if len(keep) == len(placement.pvcs) else placement.model_copy(update={"pvcs": keep})


def shared_volume(dist: DistributedConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared PVC's volume and its mount at :data:`SHARED_MOUNT`."""
    volume = {"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": dist.shared_pvc}}
    return volume, {"name": SHARED_VOLUME, "mountPath": SHARED_MOUNT}


def env_entries(env: Mapping[str, str]) -> list[dict[str, str]]:
    """``env`` as a container's ``env`` list."""
    return [{"name": k, "value": str(v)} for k, v in env.items()]


def add_container_env(templates: Iterable[Mapping[str, Any]], env: Mapping[str, str]) -> None:
    """Append ``env`` to every container of these pod templates."""
    extra = env_entries(env)
    for template in templates:
        for c in template["spec"]["containers"]:
            c["env"] += copy.deepcopy(extra)


def job_object(
    api: Mapping[str, str],
    name: str,
    run_cfg: RunConfig,
    stage: str,
    spec: dict[str, Any],
    data_fingerprint: str | None,
) -> dict[str, Any]:
    """The job object around ``spec``. Kueue admits the job as a whole: its queue labels go on the job,
    not on its pods."""
    annotations = {"kubellm.io/config-hash": run_cfg.config_hash()}
    if data_fingerprint:
        annotations["kubellm.io/data-fingerprint"] = data_fingerprint
    return {
        "apiVersion": f"{api['group']}/{api['version']}",
        "kind": api["kind"],
        "metadata": {
            "name": name,
            "namespace": run_cfg.platform.namespace,
            "labels": {**job_labels(run_cfg, stage), **run_cfg.platform.queue_labels()},
            "annotations": annotations,
        },
        "spec": spec,
    }


def condition_state(obj: Mapping[str, Any], done: str) -> tuple[str, str]:
    """``("succeeded" | "failed" | "running", reason)`` from the status conditions of an operator that
    reports ``Failed`` or ``done``."""
    for c in _conditions(obj):
        if c.get("status") != "True":
            continue
        if c.get("type") == "Failed":
            reason = ": ".join(str(x) for x in (c.get("reason"), c.get("message")) if x)
            return "failed", reason or "no reason given"
        if c.get("type") == done:
            return "succeeded", str(c.get("reason") or "")
    return "running", ""


def condition_lines(obj: Mapping[str, Any]) -> list[str]:
    """Each status condition as one log line (the launcher logs each new one)."""
    lines = []
    for c in _conditions(obj):
        status = "" if c.get("status", "True") == "True" else f"={c.get('status')}"
        detail = " ".join(str(x) for x in (c.get("reason"), c.get("message")) if x)
        lines.append(f"{c.get('type')}{status}" + (f" ({detail})" if detail else ""))
    return lines


def _conditions(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list((obj.get("status") or {}).get("conditions") or [])
