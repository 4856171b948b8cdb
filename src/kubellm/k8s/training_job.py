"""Multi-node training on Kubernetes: PyTorchJob / TrainJob / RayJob manifests and a launcher that waits.

:func:`build_job` is pure: a run config in, a manifest dict out. Every pod of a PyTorchJob or TrainJob runs
``torchrun --no-python kubellm pretrain|finetune …`` (a RayJob's Ray cluster runs the same loop under Ray
Train, see :mod:`kubellm.k8s.rayjob`) on ``platform.image`` with the restricted security context, the stage's
placement (resources, GPUs, node selector, tolerations, PVCs, secrets) and the shared PVC mounted at
:data:`SHARED_MOUNT`, where the step's own pod mounts it too, so data, checkpoints and the output
directory have the same paths on both sides.

**The run config travels inline**, as ``--set key=value`` arguments (values JSON-encoded, which YAML reads
back exactly), not as a ConfigMap: the job object alone then reproduces the run (``kubectl get -o yaml``
shows every value), its name hash covers the config, nothing else has to be created, owned and garbage
collected, and the pipeline needs no RBAC on ConfigMaps. Only the sections the stage reads are passed
(``name``, ``workdir``, the stage, ``tracking``): ``platform`` stays behind, so inside the job
``platform.distributed`` is the default (train in this process) and no pod launches a job of its own.

:func:`launch` is idempotent: the job name is a hash of the job spec and the data fingerprint, so a
retried pipeline step finds the job it started before and waits for it again instead of starting a
second one. A job of that name that already *failed* is replaced (training resumes from the last
checkpoint on the shared PVC). Status conditions go to the log as they change; a failed job raises
:class:`~kubellm.errors.ClusterError` with the operator's reason; so does the timeout.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

from kubellm.config.platform import DistributedConfig, Placement
from kubellm.config.run import RunConfig
from kubellm.errors import ClusterError, ConfigError
from kubellm.k8s import pods
from kubellm.log import get_logger

log = get_logger("k8s.training_job")

Kind = Literal["pytorchjob", "trainjob", "rayjob"]
Stage = Literal["pretrain", "finetune"]

#: Where the shared PVC is mounted in the step's pod and in every job pod.
SHARED_MOUNT = "/mnt/kubellm"
SHARED_VOLUME = "shared"
#: The training operator injects its env and port into the container of this name.
PYTORCH_CONTAINER = "pytorch"
#: Replicated job and container name in Kubeflow Trainer's torch runtimes (``torch-distributed``).
TRAINJOB_NODE = "node"
#: Identifies our entry in a TrainJob's ``runtimePatches`` (the list is keyed by manager).
PATCH_MANAGER = "kubellm.io/launcher"
#: Names stay ≤ 40 characters: PyTorchJob pods and Services are ``<job>-worker-<i>`` and JobSet pods
#: ``<job>-node-<i>-<j>-<5 chars>``, all DNS labels of at most 63.
MAX_NAME = 40
#: A SIGTERM'd trainer writes a checkpoint before it exits (LoopConfig.checkpoint_every); a 1 B-parameter
#: model with AdamW state is ~12 GB to a network volume, so give it two minutes, not the default 30 s.
GRACE_SECONDS = 120

_KINDS: dict[str, dict[str, Any]] = {
    "pytorchjob": {"group": "kubeflow.org", "version": "v1", "kind": "PyTorchJob",
                   "plural": "pytorchjobs", "done": "Succeeded"},
    "trainjob": {"group": "trainer.kubeflow.org", "version": "v1alpha1", "kind": "TrainJob",
                 "plural": "trainjobs", "done": "Complete"},
    # No conditions: the outcome is in status.jobDeploymentStatus/jobStatus (kubellm.k8s.rayjob.job_state).
    "rayjob": {"group": "ray.io", "version": "v1", "kind": "RayJob", "plural": "rayjobs", "done": None},
}


# --------------------------------------------------------------------------------------------- building

def build_job(kind: Kind, stage: Stage, run_cfg: RunConfig, data_dir: str, out_dir: str,
              base_model: str | None = None, *, data_fingerprint: str | None = None,
              env: Mapping[str, str] | None = None, plan_memory: bool = True) -> dict[str, Any]:
    """The PyTorchJob or TrainJob manifest that runs ``kubellm <stage>`` under torchrun, or the RayJob
    that runs it under Ray Train.

    ``data_dir`` and ``out_dir`` are paths on the shared PVC: relative ones are taken under
    :data:`SHARED_MOUNT`, absolute ones must lie under it. ``base_model`` (finetune) is a path on the PVC
    when absolute, otherwise passed on as given. ``data_fingerprint`` (the prepared dataset's manifest
    fingerprint) makes the job name change when the data does; without it the data path stands in.
    ``env`` adds plain variables (an MLflow parent run id, say) that do not take part in the name, so a
    retry with a fresh value still re-attaches. Raises :class:`ConfigError` for an unusable config,
    including a stage the memory planner (:mod:`kubellm.train.memory`) finds too big for its GPUs —
    before the job could wait for them (``plan_memory=False``: the caller reports that itself).
    """
    if kind not in _KINDS:
        raise ConfigError(f"training job kind {kind!r}: expected one of {sorted(_KINDS)}")
    section = getattr(run_cfg, stage, None) if stage in ("pretrain", "finetune") else None
    if section is None:
        raise ConfigError(f"{stage}: the config has no {stage!r} section to run as a training job")
    dist = run_cfg.platform.distributed_for(stage)
    if not dist.shared_pvc:
        raise ConfigError(f"platform.distributed.{stage}.shared_pvc: a training job needs a shared PVC for data "
                          f"and checkpoints")
    if plan_memory:
        from kubellm.train.memory import check_stage

        check_stage(run_cfg, stage)
    data = shared_path(data_dir, "data_dir")
    out = shared_path(out_dir, "out_dir")
    base = None
    if base_model is not None:
        base = shared_path(base_model, "base_model") if base_model.startswith("/") else base_model
    argv = ["--data", data, "--out", out, *(["--base", base] if base else []),
            *_set_args(run_cfg, stage)]
    placement = _job_placement(run_cfg.platform.placement(stage), dist, stage)
    info = _KINDS[kind]
    if kind == "rayjob":
        from kubellm.k8s.rayjob import rayjob_spec

        spec = rayjob_spec(run_cfg, stage, dist, placement, argv)
    else:
        builder = _pytorchjob_spec if kind == "pytorchjob" else _trainjob_spec
        spec = builder(run_cfg, stage, dist, placement, torchrun_command(stage, dist), argv)
    name = job_name(stage, run_cfg.name, {"kind": info["kind"], "spec": spec,
                                          "data": data_fingerprint or data})
    if env:
        _add_env(kind, spec, env)
    # Kueue admits the job as a whole: its queue labels go on the job, not on its pods.
    labels = {**job_labels(run_cfg, stage), **run_cfg.platform.queue_labels()}
    annotations = {"kubellm.io/config-hash": run_cfg.config_hash()}
    if data_fingerprint:
        annotations["kubellm.io/data-fingerprint"] = data_fingerprint
    return {
        "apiVersion": f"{info['group']}/{info['version']}",
        "kind": info["kind"],
        "metadata": {"name": name, "namespace": run_cfg.platform.namespace, "labels": labels,
                     "annotations": annotations},
        "spec": spec,
    }


def shared_path(path: str, what: str) -> str:
    """``path`` as seen inside the pods: under :data:`SHARED_MOUNT` (relative paths are joined to it)."""
    p = PurePosixPath(path)
    if ".." in p.parts:
        raise ConfigError(f"{what} {path!r}: '..' is not allowed in a path on the shared PVC")
    full = p if p.is_absolute() else PurePosixPath(SHARED_MOUNT) / p
    if full != PurePosixPath(SHARED_MOUNT) and PurePosixPath(SHARED_MOUNT) not in full.parents:
        raise ConfigError(f"{what} {path!r}: the job's pods only see the shared PVC at {SHARED_MOUNT}; "
                          f"use a path under it")
    return str(full)


def torchrun_command(stage: str, dist: DistributedConfig) -> list[str]:
    """``torchrun`` with this config's node and process counts; rank and rendezvous come from the
    operator's ``PET_*`` environment (torchrun reads ``PET_<FLAG>`` for every flag)."""
    if dist.min_nodes or dist.max_nodes:
        nnodes = f"{dist.min_nodes or dist.nodes}:{dist.max_nodes or dist.nodes}"
        elastic = [f"--max-restarts={dist.backoff_limit}"]
    else:
        nnodes, elastic = str(dist.nodes), []
    return ["torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={dist.procs_per_node}", *elastic,
            "--no-python", "kubellm", stage]


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


def _set_args(run_cfg: RunConfig, stage: str) -> list[str]:
    uri = run_cfg.tracking.uri
    if uri and (urlsplit(uri).username or urlsplit(uri).password):
        raise ConfigError("tracking.uri: credentials in the URI would be stored in the job spec; "
                          "give them as platform secret_env MLFLOW_TRACKING_USERNAME/PASSWORD")
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
    return {"app.kubernetes.io/name": "kubellm", "app.kubernetes.io/component": stage,
            "app.kubernetes.io/managed-by": "kubellm", "kubellm.io/run": run_cfg.name}


def _job_placement(placement: Placement, dist: DistributedConfig, stage: str) -> Placement:
    """The stage's placement without its own mount of the shared PVC (the step's pod mounts it at
    :data:`SHARED_MOUNT` too; the job adds it once); another volume at that path is an error."""
    keep = []
    for pvc in placement.pvcs:
        if pvc.mount_path.rstrip("/") != SHARED_MOUNT:
            keep.append(pvc)
        elif pvc.claim != dist.shared_pvc:
            raise ConfigError(f"platform placement of {stage}: PVC {pvc.claim!r} is mounted at {SHARED_MOUNT}, "
                              f"where the job mounts platform.distributed.{stage}.shared_pvc {dist.shared_pvc!r}")
    return placement if len(keep) == len(placement.pvcs) else placement.model_copy(update={"pvcs": keep})


def shared_volume(dist: DistributedConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared PVC's volume and its mount at :data:`SHARED_MOUNT`."""
    volume = {"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": dist.shared_pvc}}
    return volume, {"name": SHARED_VOLUME, "mountPath": SHARED_MOUNT}


def _pytorchjob_spec(run_cfg: RunConfig, stage: str, dist: DistributedConfig, placement: Placement,
                     command: list[str], argv: list[str]) -> dict[str, Any]:
    volume, mount = shared_volume(dist)
    container = pods.container(PYTORCH_CONTAINER, run_cfg.platform.image, placement, command=command,
                               args=argv, env={"PYTHONUNBUFFERED": "1"}, mounts=[mount],
                               working_dir="/tmp")
    template = {
        "metadata": pods.pod_metadata(placement, job_labels(run_cfg, stage)),
        "spec": pods.pod_spec([container], placement, run_cfg.platform, extra_volumes=[volume],
                              termination_grace_s=GRACE_SECONDS),
    }
    elastic = bool(dist.min_nodes or dist.max_nodes)

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": dist.restart_policy, "template": copy.deepcopy(template)}

    spec: dict[str, Any] = {
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
        spec["elasticPolicy"] = {"minReplicas": dist.min_nodes or dist.nodes,
                                 "maxReplicas": dist.max_nodes or dist.nodes,
                                 "maxRestarts": dist.backoff_limit, "rdzvBackend": "c10d"}
        spec["pytorchReplicaSpecs"] = {"Worker": replica(dist.nodes)}
    else:
        spec["pytorchReplicaSpecs"] = {"Master": replica(1)}
        if dist.nodes > 1:
            spec["pytorchReplicaSpecs"]["Worker"] = replica(dist.nodes - 1)
    return spec


#: Pod-spec and container fields a TrainJob runtime patch may set (its CRD allows no others).
_PATCH_POD_FIELDS = ("serviceAccountName", "securityContext", "containers", "volumes", "nodeSelector",
                     "tolerations", "imagePullSecrets", "terminationGracePeriodSeconds")
_PATCH_CONTAINER_FIELDS = ("name", "securityContext", "volumeMounts")


def _trainjob_spec(run_cfg: RunConfig, stage: str, dist: DistributedConfig, placement: Placement,
                   command: list[str], argv: list[str]) -> dict[str, Any]:
    volume, mount = shared_volume(dist)
    full = pods.container(TRAINJOB_NODE, run_cfg.platform.image, placement, env={"PYTHONUNBUFFERED": "1"},
                          mounts=[mount])
    pod = pods.pod_spec([full], placement, run_cfg.platform, extra_volumes=[volume],
                        termination_grace_s=GRACE_SECONDS)
    pod["containers"] = [{k: full[k] for k in _PATCH_CONTAINER_FIELDS}]
    pod_patch = {k: pod[k] for k in _PATCH_POD_FIELDS if k in pod}
    trainer: dict[str, Any] = {
        "image": run_cfg.platform.image,
        "command": command,
        "args": argv,
        "env": full["env"],
        "numNodes": dist.nodes,
        "numProcPerNode": dist.procs_per_node,
    }
    if "resources" in full:
        trainer["resourcesPerNode"] = full["resources"]
    return {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                       "name": dist.runtime},
        "activeDeadlineSeconds": dist.timeout_seconds,
        "trainer": trainer,
        "runtimePatches": [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                "name": TRAINJOB_NODE,
                "template": {"spec": {"template": {
                    "metadata": pods.pod_metadata(placement, job_labels(run_cfg, stage)),
                    "spec": pod_patch,
                }}},
            }]}}},
        }],
    }


def _add_env(kind: str, spec: dict[str, Any], env: Mapping[str, str]) -> None:
    extra = [{"name": k, "value": str(v)} for k, v in env.items()]
    if kind == "trainjob":
        spec["trainer"]["env"] += extra
        return
    if kind == "rayjob":
        cluster = spec["rayClusterSpec"]
        templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    else:
        templates = [replica["template"] for replica in spec["pytorchReplicaSpecs"].values()]
    for template in templates:
        for c in template["spec"]["containers"]:
            c["env"] += copy.deepcopy(extra)


# ------------------------------------------------------------------------------------------- launching

@dataclass(frozen=True)
class JobOutcome:
    """A training job that finished successfully (failures and timeouts raise ClusterError)."""

    kind: str
    """``PyTorchJob``, ``TrainJob`` or ``RayJob``."""
    name: str
    namespace: str
    created: bool
    """``False``: an existing job of the same name was re-attached to."""
    restarted: bool
    """A failed job of the same name was deleted and created again."""
    elapsed_s: float
    """Seconds this call waited."""
    conditions: tuple[str, ...]
    """Every status condition seen, in order, as logged."""


def launch(job: dict, namespace: str, *, api_client: Any = None, timeout_s: float, poll_s: float = 5.0,
           replace_failed: bool = True) -> JobOutcome:
    """Create ``job`` in ``namespace`` (or re-attach to it) and wait until it succeeds.

    ``api_client`` defaults to :func:`kubellm.k8s.client.load_api_client` (in-cluster, else kubeconfig).
    ``replace_failed``: a job of the same name that already failed is deleted and created again (a
    retry resumes from the last checkpoint) rather than failing the step at once.
    Raises :class:`ClusterError` when the job fails (with the operator's or Ray's reason), when ``timeout_s``
    passes (the job is left to the operator's own deadline), or when the API cannot be used.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from kubellm.k8s.client import api_errors, load_api_client

    info = _kind_info(job)
    name = job.get("metadata", {}).get("name", "")
    where = f"{info['kind']} {namespace}/{name}"
    job = copy.deepcopy(job)
    job["metadata"]["namespace"] = namespace
    api = client.CustomObjectsApi(api_client if api_client is not None else load_api_client())
    ref = (info["group"], info["version"], namespace, info["plural"])
    start = time.monotonic()
    deadline = start + timeout_s

    def get() -> dict[str, Any] | None:
        with api_errors(f"reading {where}"):
            try:
                return api.get_namespaced_custom_object(*ref, name)
            except ApiException as err:
                if err.status == 404:
                    return None
                raise

    restarted = False
    existing = get()
    if existing is not None and _state(existing, info)[0] == "failed" and replace_failed:
        log.info("%s failed before (%s); replacing it", where, _state(existing, info)[1])
        with api_errors(f"deleting failed {where}"):
            api.delete_namespaced_custom_object(*ref, name, propagation_policy="Foreground")
        while get() is not None:
            if time.monotonic() >= deadline:
                raise ClusterError(f"{where}: the failed job was not deleted within {timeout_s:g}s")
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        existing, restarted = None, True
    created = existing is None
    if created:
        with api_errors(f"creating {where}"):
            try:
                api.create_namespaced_custom_object(*ref, job)
            except ApiException as err:
                if err.status != 409:
                    raise
                created = False  # another attempt created it meanwhile: wait for that one
        log.info("%s %s", "created" if created else "re-attached to (created concurrently)", where)
    else:
        log.info("re-attached to %s (a retried step waits for the job it started before)", where)

    seen: list[str] = []
    while True:
        obj = get()
        if obj is None:
            raise ClusterError(f"{where} was deleted while the step waited for it")
        for line in _condition_lines(obj):
            if line not in seen:
                seen.append(line)
                log.info("%s: %s", where, line)
        state, reason = _state(obj, info)
        if state == "succeeded":
            return JobOutcome(info["kind"], name, namespace, created, restarted, time.monotonic() - start, tuple(seen))
        if state == "failed":
            raise ClusterError(f"{where} failed: {reason}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            last = seen[-1] if seen else "no status yet"
            raise ClusterError(f"{where} did not finish within {timeout_s:g}s (last: {last}); a retried "
                               f"step re-attaches to it, `kubectl delete {info['plural']} {name} -n "
                               f"{namespace}` stops it")
        time.sleep(min(poll_s, remaining))


def run_training_job(stage: Stage, run_cfg: RunConfig, data_dir: str, out_dir: str,
                     base_model: str | None = None, *, data_fingerprint: str | None = None,
                     env: Mapping[str, str] | None = None, api_client: Any = None,
                     poll_s: float = 5.0) -> JobOutcome:
    """Build the job ``platform.distributed.<stage>.engine`` names and launch it with the config's timeout.

    The same call for every engine: ``env`` reaches every pod (and, for a RayJob, the Ray Train driver
    and workers), e.g. ``{"KUBELLM_STAGE_RUN_ID": run_id}`` for rank 0 to log into the stage's run.
    """
    dist = run_cfg.platform.distributed_for(stage)
    if getattr(run_cfg, stage, None) is None or dist.engine == "none":
        raise ConfigError(f"platform.distributed.{stage}.engine: 'none' trains in this process; set "
                          f"'pytorchjob', 'trainjob' or 'rayjob' to run a training job")
    job = build_job(dist.engine, stage, run_cfg, data_dir, out_dir, base_model,
                    data_fingerprint=data_fingerprint, env=env)
    return launch(job, run_cfg.platform.namespace, api_client=api_client,
                  timeout_s=dist.timeout_seconds, poll_s=poll_s)


def _kind_info(job: Mapping[str, Any]) -> dict[str, Any]:
    for info in _KINDS.values():
        if job.get("kind") == info["kind"] and job.get("apiVersion") == f"{info['group']}/{info['version']}":
            return info
    raise ClusterError(f"cannot launch {job.get('apiVersion')}/{job.get('kind')}: expected a "
                       f"kubeflow.org/v1 PyTorchJob, a trainer.kubeflow.org/v1alpha1 TrainJob or a "
                       f"ray.io/v1 RayJob")


def _conditions(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list((obj.get("status") or {}).get("conditions") or [])


def _condition_lines(obj: Mapping[str, Any]) -> list[str]:
    if obj.get("kind") == "RayJob":
        from kubellm.k8s.rayjob import status_lines

        return status_lines(obj)
    lines = []
    for c in _conditions(obj):
        status = "" if c.get("status", "True") == "True" else f"={c.get('status')}"
        detail = " ".join(str(x) for x in (c.get("reason"), c.get("message")) if x)
        lines.append(f"{c.get('type')}{status}" + (f" ({detail})" if detail else ""))
    return lines


def _state(obj: Mapping[str, Any], info: Mapping[str, Any]) -> tuple[str, str]:
    """``("succeeded" | "failed" | "running", reason)`` from the status conditions."""
    if info["kind"] == "RayJob":
        from kubellm.k8s.rayjob import job_state

        return job_state(obj)
    for c in _conditions(obj):
        if c.get("status") != "True":
            continue
        if c.get("type") == "Failed":
            reason = ": ".join(str(x) for x in (c.get("reason"), c.get("message")) if x)
            return "failed", reason or "no reason given"
        if c.get("type") == info["done"]:
            return "succeeded", str(c.get("reason") or "")
    return "running", ""
