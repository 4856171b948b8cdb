"""Building and launching a training job of any kind (PyTorchJob, TrainJob, RayJob), and the prep RayJob.

:func:`build_job` is pure: a run config in, a manifest dict out. It checks what every kind needs (a
shared PVC, paths on it, the memory plan) and hands the kind's spec to its module:
:mod:`kubellm.k8s.pytorchjob` and :mod:`kubellm.k8s.trainjob` run ``torchrun --no-python kubellm
pretrain|finetune …`` on every pod, :mod:`kubellm.k8s.rayjob`'s Ray cluster runs the same loop under Ray
Train; what all of them share (the shared PVC at :data:`~kubellm.k8s.jobspec.SHARED_MOUNT`, the run config
inline as ``--set`` arguments, names, labels) is in :mod:`kubellm.k8s.jobspec`.

:func:`launch` is idempotent: the job name is a hash of the job spec and the data fingerprint, so a
retried pipeline step finds the job it started before and waits for it again instead of starting a
second one. A job of that name that already *failed* is replaced (training resumes from the last
checkpoint on the shared PVC). Status conditions go to the log as they change; a failed job raises
:class:`~kubellm.errors.ClusterError` with the operator's reason; so does the timeout.
:func:`run_training_job` and :func:`run_prep_rayjob` build and launch in one call.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from kubellm.config.run import RunConfig
from kubellm.errors import ClusterError, ConfigError
from kubellm.k8s import pytorchjob, rayjob, trainjob
from kubellm.k8s.jobspec import Stage, job_name, job_object, job_placement, set_args, shared_path
from kubellm.log import get_logger

log = get_logger("k8s.training_job")

Kind = Literal["pytorchjob", "trainjob", "rayjob"]
#: Each kind's module: its ``API`` (group, version, kind, plural), ``spec``, ``add_env``, ``state`` and
#: ``status_lines``.
KINDS: dict[str, ModuleType] = {"pytorchjob": pytorchjob, "trainjob": trainjob, "rayjob": rayjob}


# --------------------------------------------------------------------------------------------- building


def build_job(
    kind: Kind,
    stage: Stage,
    run_cfg: RunConfig,
    data_dir: str,
    out_dir: str,
    base_model: str | None = None,
    *,
    data_fingerprint: str | None = None,
    env: Mapping[str, str] | None = None,
    plan_memory: bool = True,
) -> dict[str, Any]:
    """The PyTorchJob or TrainJob manifest that runs ``kubellm <stage>`` under torchrun, or the RayJob
    that runs it under Ray Train.

    ``data_dir`` and ``out_dir`` are paths on the shared PVC: relative ones are taken under
    :data:`~kubellm.k8s.jobspec.SHARED_MOUNT`, absolute ones must lie under it. ``base_model`` (finetune) is a path on
    the PVC
    when absolute, otherwise passed on as given. ``data_fingerprint`` (the prepared dataset's manifest
    fingerprint) makes the job name change when the data does; without it the data path stands in.
    ``env`` adds plain variables (an MLflow parent run id, say) that do not take part in the name, so a
    retry with a fresh value still re-attaches. Raises :class:`ConfigError` for an unusable config,
    including a stage the memory planner (:mod:`kubellm.train.memory`) finds too big for its GPUs —
    before the job could wait for them (``plan_memory=False``: the caller reports that itself).
    """
    if kind not in KINDS:
        raise ConfigError(f"training job kind {kind!r}: expected one of {sorted(KINDS)}")
    section = getattr(run_cfg, stage, None) if stage in ("pretrain", "finetune") else None
    if section is None:
        raise ConfigError(f"{stage}: the config has no {stage!r} section to run as a training job")
    dist = run_cfg.platform.distributed_for(stage)
    if not dist.shared_pvc:
        raise ConfigError(
            f"platform.distributed.{stage}.shared_pvc: a training job needs a shared PVC for data and checkpoints"
        )
    if plan_memory:
        from kubellm.train.memory import check_stage

        check_stage(run_cfg, stage)
    data = shared_path(data_dir, "data_dir")
    out = shared_path(out_dir, "out_dir")
    base = None
    if base_model is not None:
        base = shared_path(base_model, "base_model") if base_model.startswith("/") else base_model
    argv = ["--data", data, "--out", out, *(["--base", base] if base else []), *set_args(run_cfg, stage)]
    placement = job_placement(run_cfg.platform.placement(stage), dist, stage)
    module = KINDS[kind]
    spec = module.spec(run_cfg, stage, dist, placement, argv)
    name = job_name(stage, run_cfg.name, {"kind": module.API["kind"], "spec": spec, "data": data_fingerprint or data})
    if env:
        module.add_env(spec, env)
    return job_object(module.API, name, run_cfg, stage, spec, data_fingerprint)


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


def launch(
    job: dict,
    namespace: str,
    *,
    api_client: Any = None,
    timeout_s: float,
    poll_s: float = 5.0,
    replace_failed: bool = True,
) -> JobOutcome:
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

    module = _kind_module(job)
    info = module.API
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
    if existing is not None and module.state(existing)[0] == "failed" and replace_failed:
        log.info("%s failed before (%s); replacing it", where, module.state(existing)[1])
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
        for line in module.status_lines(obj):
            if line not in seen:
                seen.append(line)
                log.info("%s: %s", where, line)
        state, reason = module.state(obj)
        if state == "succeeded":
            return JobOutcome(info["kind"], name, namespace, created, restarted, time.monotonic() - start, tuple(seen))
        if state == "failed":
            raise ClusterError(f"{where} failed: {reason}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            last = seen[-1] if seen else "no status yet"
            raise ClusterError(
                f"{where} did not finish within {timeout_s:g}s (last: {last}); a retried "
                f"step re-attaches to it, `kubectl delete {info['plural']} {name} -n "
                f"{namespace}` stops it"
            )
        time.sleep(min(poll_s, remaining))


def run_training_job(
    stage: Stage,
    run_cfg: RunConfig,
    data_dir: str,
    out_dir: str,
    base_model: str | None = None,
    *,
    data_fingerprint: str | None = None,
    env: Mapping[str, str] | None = None,
    api_client: Any = None,
    poll_s: float = 5.0,
) -> JobOutcome:
    """Build the job ``platform.distributed.<stage>.engine`` names and launch it with the config's timeout.

    The same call for every engine: ``env`` reaches every pod (and, for a RayJob, the Ray Train driver
    and workers), e.g. ``{"KUBELLM_STAGE_RUN_ID": run_id}`` for rank 0 to log into the stage's run.
    """
    dist = run_cfg.platform.distributed_for(stage)
    if getattr(run_cfg, stage, None) is None or dist.engine == "none":
        raise ConfigError(
            f"platform.distributed.{stage}.engine: 'none' trains in this process; set "
            f"'pytorchjob', 'trainjob' or 'rayjob' to run a training job"
        )
    job = build_job(
        dist.engine, stage, run_cfg, data_dir, out_dir, base_model, data_fingerprint=data_fingerprint, env=env
    )
    return launch(job, run_cfg.platform.namespace, api_client=api_client, timeout_s=dist.timeout_seconds, poll_s=poll_s)


def run_prep_rayjob(
    run_cfg: RunConfig,
    section: str,
    out_dir: str,
    tokenizer_dir: str | None = None,
    *,
    run_key: str | None = None,
    env: Mapping[str, str] | None = None,
    api_client: Any = None,
    poll_s: float = 5.0,
) -> tuple[dict[str, Any], JobOutcome]:
    """Build the prep RayJob (:func:`kubellm.k8s.rayjob.build_prep_rayjob`) and launch it with
    ``<section>.cluster``'s timeout: the one launcher of ``kubellm prep`` and of the pipeline's prep steps.
    Returns the job and its outcome; a failed job or the timeout raises :class:`~kubellm.errors.ClusterError`
    naming the job."""
    job = rayjob.build_prep_rayjob(run_cfg, section, out_dir, tokenizer_dir, run_key=run_key, env=env)
    timeout = getattr(run_cfg, section).cluster.timeout_seconds
    return job, launch(job, run_cfg.platform.namespace, api_client=api_client, timeout_s=timeout, poll_s=poll_s)


def _kind_module(job: Mapping[str, Any]) -> ModuleType:
    for module in KINDS.values():
        api = module.API
        if job.get("kind") == api["kind"] and job.get("apiVersion") == f"{api['group']}/{api['version']}":
            return module
    raise ClusterError(
        f"cannot launch {job.get('apiVersion')}/{job.get('kind')}: expected a "
        f"kubeflow.org/v1 PyTorchJob, a trainer.kubeflow.org/v1alpha1 TrainJob or a "
        f"ray.io/v1 RayJob"
    )
