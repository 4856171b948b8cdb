"""The restricted pod security every pod kubellm generates runs with.

Pod Security Standards ``restricted`` asks for: non-root, no privilege escalation, all capabilities
dropped, a RuntimeDefault (or Localhost) seccomp profile. We also make the root filesystem read-only and
give the writable paths a process needs (``/tmp``, caches, ``HOME``) as emptyDir volumes.

Plain dicts in Kubernetes' camelCase: they drop straight into any manifest (Deployment, PyTorchJob,
TrainJob, InferenceService predictor) and serialise to YAML unchanged.
"""

from __future__ import annotations

from typing import Any

#: Numeric, non-root user and group of every kubellm image (images/ create this user).
RUNTIME_UID = 1000
RUNTIME_GID = 1000

#: Writable paths on a read-only root filesystem: name → mount path. HOME is /home/kubellm in the images.
WRITABLE_PATHS = {
    "tmp": "/tmp",
    "cache": "/home/kubellm/.cache",
}

#: Environment that points every cache at the writable volumes.
CACHE_ENV = {
    "HOME": "/home/kubellm",
    "HF_HOME": "/home/kubellm/.cache/huggingface",
    "TRANSFORMERS_CACHE": "/home/kubellm/.cache/huggingface",
    "MPLCONFIGDIR": "/tmp/matplotlib",
    "TRITON_CACHE_DIR": "/tmp/triton",
}


def pod_security_context(uid: int = RUNTIME_UID, gid: int = RUNTIME_GID) -> dict[str, Any]:
    """Pod-level ``securityContext``."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": gid,
        "fsGroup": gid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(
    uid: int = RUNTIME_UID, gid: int = RUNTIME_GID, read_only_root: bool = True
) -> dict[str, Any]:
    """Container-level ``securityContext`` satisfying Pod Security ``restricted``."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": gid,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def writable_volumes(size_limit: str = "4Gi") -> list[dict[str, Any]]:
    """emptyDir volumes for the writable paths (``/dev/shm`` is memory-backed for DataLoader workers)."""
    vols = [{"name": name, "emptyDir": {"sizeLimit": size_limit}} for name in WRITABLE_PATHS]
    vols.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
    return vols


def writable_mounts() -> list[dict[str, Any]]:
    mounts = [{"name": name, "mountPath": path} for name, path in WRITABLE_PATHS.items()]
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return mounts


def cache_env() -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in CACHE_ENV.items()]
