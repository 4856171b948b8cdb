"""Pod specs from a stage's :class:`~kubellm.config.platform.Placement`, restricted by default.

One place turns the placement fields of a run config (resources, GPUs, node selector, tolerations, PVCs,
secrets) into Kubernetes camelCase, so a training job, a predictor and a playground Deployment all get
the same security context, writable volumes and cache environment from :mod:`kubellm.k8s.security`.
Pure functions: plain dicts in, plain dicts out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubellm.config.platform import Placement, PlatformConfig, Resources
from kubellm.k8s import security

#: Node label that ``resources.accelerator`` selects on (GKE's label; elsewhere use ``node_selector``).
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
#: Extended resource name of NVIDIA GPUs (the device plugin's).
GPU_RESOURCE = "nvidia.com/gpu"


def resources(res: Resources) -> dict[str, Any]:
    """The container ``resources`` block (empty sections left out)."""
    requests = {k: v for k, v in (("cpu", res.cpu_request), ("memory", res.memory_request)) if v}
    limits: dict[str, Any] = {k: v for k, v in (("cpu", res.cpu_limit), ("memory", res.memory_limit)) if v}
    if res.gpus:
        # Extended resources are limits only (a request, if given, must equal the limit).
        limits[GPU_RESOURCE] = res.gpus
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def env_list(placement: Placement, extra: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Cache paths, then ``extra`` plain values, then the placement's Secret keys (``secretKeyRef``)."""
    env = security.cache_env()
    env += [{"name": k, "value": str(v)} for k, v in (extra or {}).items()]
    env += [
        {"name": s.env, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key}}} for s in placement.secret_env
    ]
    return env


def volumes(placement: Placement, extra: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Writable emptyDirs, the placement's PVCs and Secret volumes, then ``extra``."""
    vols = security.writable_volumes()
    vols += [
        {"name": _vol_name("pvc", i), "persistentVolumeClaim": {"claimName": p.claim}}
        for i, p in enumerate(placement.pvcs)
    ]
    # 0440: readable by the runtime group only, not world-readable.
    vols += [
        {"name": _vol_name("secret", i), "secret": {"secretName": s.secret, "defaultMode": 0o440}}
        for i, s in enumerate(placement.secret_volumes)
    ]
    vols += [dict(v) for v in extra]
    return vols


def volume_mounts(placement: Placement, extra: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Mounts matching :func:`volumes` (Secret volumes read-only)."""
    mounts = security.writable_mounts()
    mounts += [{"name": _vol_name("pvc", i), "mountPath": p.mount_path} for i, p in enumerate(placement.pvcs)]
    mounts += [
        {"name": _vol_name("secret", i), "mountPath": s.mount_path, "readOnly": True}
        for i, s in enumerate(placement.secret_volumes)
    ]
    mounts += [dict(m) for m in extra]
    return mounts


def container(
    name: str,
    image: str,
    placement: Placement,
    *,
    command: list[str] | None = None,
    args: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    mounts: Iterable[Mapping[str, Any]] = (),
    working_dir: str | None = None,
    ports: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A restricted container: read-only root, writable /tmp and caches, placement's resources/secrets."""
    out: dict[str, Any] = {"name": name, "image": image}
    if command:
        out["command"] = list(command)
    if args:
        out["args"] = list(args)
    if working_dir:
        out["workingDir"] = working_dir
    out["env"] = env_list(placement, env)
    if ports:
        out["ports"] = [dict(p) for p in ports]
    res = resources(placement.resources)
    if res:
        out["resources"] = res
    out["volumeMounts"] = volume_mounts(placement, mounts)
    out["securityContext"] = security.container_security_context()
    return out


def pod_spec(
    containers: list[dict[str, Any]],
    placement: Placement,
    platform: PlatformConfig,
    *,
    extra_volumes: Iterable[Mapping[str, Any]] = (),
    restart_policy: str | None = None,
    api_access: bool = False,
    termination_grace_s: int | None = None,
) -> dict[str, Any]:
    """A pod spec around ``containers`` with the placement's scheduling and the restricted context.

    ``api_access=False`` leaves the service-account token unmounted: a training or serving pod never
    talks to the Kubernetes API, so a compromised process gets no credentials.
    """
    spec: dict[str, Any] = {
        "serviceAccountName": platform.service_account,
        "automountServiceAccountToken": api_access,
        "securityContext": security.pod_security_context(),
        "containers": containers,
        "volumes": volumes(placement, extra_volumes),
    }
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if termination_grace_s is not None:
        spec["terminationGracePeriodSeconds"] = termination_grace_s
    selector = node_selector(placement)
    if selector:
        spec["nodeSelector"] = selector
    if placement.tolerations:
        spec["tolerations"] = tolerations(placement)
    if platform.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in platform.image_pull_secrets]
    return spec


def node_selector(placement: Placement) -> dict[str, str]:
    """The placement's node labels plus the accelerator label when ``resources.accelerator`` is set."""
    selector = dict(placement.node_selector)
    if placement.resources.accelerator:
        selector.setdefault(ACCELERATOR_LABEL, placement.resources.accelerator)
    return selector


def tolerations(placement: Placement) -> list[dict[str, Any]]:
    """Tolerations in camelCase, unset fields left out."""
    return [{k: v for k, v in t.model_dump().items() if v is not None} for t in placement.tolerations]


def pod_metadata(placement: Placement, labels: Mapping[str, str]) -> dict[str, Any]:
    """Pod template metadata: ``labels`` plus the placement's extra labels and annotations."""
    meta: dict[str, Any] = {"labels": {**labels, **placement.labels}}
    if placement.annotations:
        meta["annotations"] = dict(placement.annotations)
    return meta


def _vol_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index}"
