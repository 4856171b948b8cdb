"""Our own Pod Security ``restricted`` checker, including pod specs inside custom resources.

Generic tools (checkov, the admission controller's dry run) only look at built-in kinds; the pods of a
PyTorchJob, a TrainJob's runtime patches, a RayJob's Ray cluster or an InferenceService predictor are
invisible to them. This
checker finds every pod spec in a manifest and applies the Pod Security Standards
(https://kubernetes.io/docs/concepts/security/pod-security-standards/, v1.30 rules):

- *baseline*: no host namespaces, no privileged containers, no added capabilities beyond the baseline
  set, no hostPath volumes, no host ports, no unconfined AppArmor, restricted SELinux, default /proc
  mount, no unconfined seccomp, only safe sysctls, no Windows host processes;
- *restricted*: only the ephemeral/projected volume types, ``allowPrivilegeEscalation: false``,
  ``runAsNonRoot: true`` and no UID 0, a ``RuntimeDefault``/``Localhost`` seccomp profile, all
  capabilities dropped (only ``NET_BIND_SERVICE`` may be added back);
- *kubellm*: a read-only root filesystem, with a volume at ``/tmp`` (writable paths are emptyDirs, see
  :mod:`kubellm.k8s.security`); no pods an operator builds out of sight: a TrainJob without a pod patch
  (the runtime's pods) or a RayJob whose submission mode adds an operator-built submitter (``K8sJobMode``,
  the default, without a ``submitterPodTemplate``; ``SidecarMode``).

Pod-level ``runAsNonRoot``/``runAsUser``/``seccompProfile`` count for containers that do not set their
own, as Kubernetes applies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubellm.errors import KubellmError

#: Volume types ``restricted`` allows.
RESTRICTED_VOLUMES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
#: Sysctls ``baseline`` allows.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
#: InferenceService components and the model-framework keys that are containers themselves.
ISVC_COMPONENTS = ("predictor", "transformer", "explainer")
ISVC_FRAMEWORKS = (
    "model",
    "huggingface",
    "lightgbm",
    "onnx",
    "paddle",
    "pmml",
    "pytorch",
    "sklearn",
    "tensorflow",
    "triton",
    "xgboost",
    "art",
    "alibi",
)
#: Volume keys that are not the volume type.
_VOLUME_META = frozenset({"name"})


@dataclass(frozen=True)
class Finding:
    """One violation: which rule, where in the object, and what is wrong."""

    rule: str
    """Short rule id, e.g. ``runAsNonRoot`` or ``hostPath``."""
    level: str
    """``baseline``, ``restricted`` or ``kubellm``."""
    path: str
    """Dotted path of the offending field inside the object."""
    message: str
    where: str = ""
    """``Kind/name`` of the object (and its file, for files)."""

    def __str__(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.path}: {self.message} [{self.level}/{self.rule}]"


@dataclass(frozen=True)
class PodSpec:
    """A pod spec found in a manifest: its path, the pod-level dict and its containers."""

    path: str
    spec: Mapping[str, Any]
    containers: tuple[tuple[str, Mapping[str, Any]], ...]


def check(obj: dict) -> list[Finding]:
    """Every ``restricted`` (and read-only root filesystem) violation in one manifest object.

    ``kind: List`` objects are checked item by item. Objects without pods (Services, Roles) have none.
    """
    if obj.get("kind") == "List":
        return [f for item in obj.get("items") or [] if isinstance(item, dict) for f in check(item)]
    where = f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"
    findings: list[Finding] = []
    specs = pod_specs(obj)
    if obj.get("kind") == "TrainJob" and not specs:
        findings.append(
            Finding(
                "runtime-pods-unchecked",
                "kubellm",
                "spec",
                "no pod spec patch: the pods' security context comes from the training "
                "runtime and cannot be checked here",
                where,
            )
        )
    if obj.get("kind") == "RayJob":
        findings += [Finding(f.rule, f.level, f.path, f.message, where) for f in _rayjob_submitter(obj)]
    for pod in specs:
        findings += [Finding(f.rule, f.level, f.path, f.message, where) for f in _check_pod(pod)]
    return findings


def _rayjob_submitter(obj: Mapping[str, Any]) -> Iterator[Finding]:
    """The submitter pod or container KubeRay adds on its own, which no manifest shows."""
    spec = obj.get("spec") if isinstance(obj.get("spec"), Mapping) else {}
    mode = spec.get("submissionMode") or "K8sJobMode"
    if mode == "K8sJobMode" and not isinstance(spec.get("submitterPodTemplate"), Mapping):
        yield Finding(
            "submitter-pod-unchecked",
            "kubellm",
            "spec.submissionMode",
            "K8sJobMode (the default) runs a submitter pod built by the operator, whose security "
            "context cannot be checked here: use HTTPMode or give spec.submitterPodTemplate",
        )
    elif mode == "SidecarMode":
        yield Finding(
            "submitter-pod-unchecked",
            "kubellm",
            "spec.submissionMode",
            "SidecarMode adds a submitter container built by the operator to the head pod, whose "
            "security context cannot be checked here: use HTTPMode",
        )


def pod_specs(obj: Mapping[str, Any]) -> list[PodSpec]:
    """Every pod spec in ``obj``: any mapping holding a ``containers`` list (Pods, workload templates,
    training-operator replica specs, TrainJob/JobSet patches and overrides, a RayJob's head, worker and
    submitter templates), plus InferenceService
    components, whose model-framework entries (``model``, ``huggingface``…) are containers too."""
    found: list[PodSpec] = []
    spec = obj.get("spec")
    isvc = obj.get("kind") == "InferenceService" and isinstance(spec, Mapping)
    if isvc:
        for comp in ISVC_COMPONENTS:
            component = spec.get(comp)
            if isinstance(component, Mapping):
                found.append(_pod(f"spec.{comp}", component, frameworks=True))
    overrides: set[str] = set()
    if obj.get("kind") == "TrainJob" and isinstance(spec, Mapping):
        # Trainer v2.0's podSpecOverrides entries are pod specs even when they set only volumes.
        for i, override in enumerate(spec.get("podSpecOverrides") or []):
            if isinstance(override, Mapping):
                overrides.add(f"spec.podSpecOverrides[{i}]")
                found.append(_pod(f"spec.podSpecOverrides[{i}]", override))
    for path, node in _walk(spec, "spec"):
        if path in overrides or (isvc and path.count(".") == 1 and path.split(".")[1] in ISVC_COMPONENTS):
            continue
        if isinstance(node.get("containers"), list) or isinstance(node.get("initContainers"), list):
            found.append(_pod(path, node))
    return found


def _pod(path: str, node: Mapping[str, Any], frameworks: bool = False) -> PodSpec:
    containers = [
        (f"{path}.{key}[{i}]", c)
        for key in CONTAINER_LISTS
        for i, c in enumerate(node.get(key) or [])
        if isinstance(c, Mapping)
    ]
    if frameworks:
        containers += [(f"{path}.{key}", node[key]) for key in ISVC_FRAMEWORKS if isinstance(node.get(key), Mapping)]
    return PodSpec(path, node, tuple(containers))


def _walk(node: Any, path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(node, Mapping):
        yield path, node
        for key, value in node.items():
            if key not in CONTAINER_LISTS:  # a container never holds a pod spec
                yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _check_pod(pod: PodSpec) -> Iterator[Finding]:
    spec, base = pod.spec, pod.path
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field) is True:
            yield Finding("host-namespaces", "baseline", f"{base}.{field}", "shares the host's namespace")
    for i, vol in enumerate(spec.get("volumes") or []):
        kinds = [k for k in vol if k not in _VOLUME_META]
        vpath = f"{base}.volumes[{i}]"
        if "hostPath" in kinds:
            yield Finding("hostPath", "baseline", f"{vpath}.hostPath", "mounts a directory of the node")
        elif any(k not in RESTRICTED_VOLUMES for k in kinds):
            yield Finding(
                "volume-types",
                "restricted",
                vpath,
                f"volume type {', '.join(kinds)} is not allowed (only {', '.join(sorted(RESTRICTED_VOLUMES))})",
            )
    psc = spec.get("securityContext") or {}
    for i, sysctl in enumerate(psc.get("sysctls") or []):
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield Finding(
                "sysctls", "baseline", f"{base}.securityContext.sysctls[{i}]", f"unsafe sysctl {sysctl.get('name')!r}"
            )
    yield from _context_rules(psc, f"{base}.securityContext")
    if psc.get("runAsUser") == 0:
        yield Finding("runAsUser", "restricted", f"{base}.securityContext.runAsUser", "runs as root (UID 0)")
    for cpath, c in pod.containers:
        yield from _check_container(c, cpath, psc)


def _context_rules(sc: Mapping[str, Any], path: str) -> Iterator[Finding]:
    """Rules that apply alike to a pod's and a container's securityContext."""
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        yield Finding("seLinux", "baseline", f"{path}.seLinuxOptions", "custom SELinux user, role or type")
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        yield Finding("appArmor", "baseline", f"{path}.appArmorProfile", "AppArmor is Unconfined")
    if (sc.get("windowsOptions") or {}).get("hostProcess") is True:
        yield Finding("hostProcess", "baseline", f"{path}.windowsOptions.hostProcess", "Windows host process")


def _check_container(c: Mapping[str, Any], path: str, psc: Mapping[str, Any]) -> Iterator[Finding]:
    sc = c.get("securityContext") or {}
    sp = f"{path}.securityContext"
    yield from _context_rules(sc, sp)
    if sc.get("privileged") is True:
        yield Finding("privileged", "baseline", f"{sp}.privileged", "privileged container")
    if sc.get("allowPrivilegeEscalation") is not False:
        yield Finding("allowPrivilegeEscalation", "restricted", f"{sp}.allowPrivilegeEscalation", "must be false")
    caps = sc.get("capabilities") or {}
    added = [cap for cap in caps.get("add") or [] if cap != "NET_BIND_SERVICE"]
    if added:
        yield Finding(
            "capabilities-add",
            "restricted",
            f"{sp}.capabilities.add",
            f"adds {', '.join(map(str, added))} (only NET_BIND_SERVICE may be added)",
        )
    if "ALL" not in (caps.get("drop") or []):
        yield Finding("capabilities-drop", "restricted", f"{sp}.capabilities.drop", "must drop ALL")
    non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
    if non_root is not True:
        yield Finding(
            "runAsNonRoot", "restricted", f"{sp}.runAsNonRoot", "must be true (here or in the pod's securityContext)"
        )
    if sc.get("runAsUser") == 0:
        yield Finding("runAsUser", "restricted", f"{sp}.runAsUser", "runs as root (UID 0)")
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        yield Finding(
            "seccompProfile",
            "restricted",
            f"{sp}.seccompProfile",
            f"type must be RuntimeDefault or Localhost (here or in the pod), not {seccomp or 'unset'}",
        )
    if sc.get("procMount", "Default") != "Default":
        yield Finding("procMount", "baseline", f"{sp}.procMount", "must be Default")
    if sc.get("readOnlyRootFilesystem") is not True:
        yield Finding(
            "readOnlyRootFilesystem",
            "kubellm",
            f"{sp}.readOnlyRootFilesystem",
            "must be true (give writable paths as emptyDir volumes)",
        )
    elif not any(m.get("mountPath", "").rstrip("/") == "/tmp" for m in c.get("volumeMounts") or []):
        # Python's tempfile, torch and gunicorn need a writable /tmp: without one the pod fails at run time.
        yield Finding(
            "writable-tmp",
            "kubellm",
            f"{path}.volumeMounts",
            "read-only root filesystem without a volume at /tmp (mount an emptyDir there)",
        )
    for i, port in enumerate(c.get("ports") or []):
        if port.get("hostPort"):
            yield Finding("hostPorts", "baseline", f"{path}.ports[{i}].hostPort", "binds a port of the node")


# ------------------------------------------------------------------------------------------------ files


def load_manifests(path: str | Path) -> list[dict[str, Any]]:
    """The mapping documents of a YAML (or JSON) file; raises a one-line KubellmError on bad YAML."""
    import yaml

    from kubellm import yamlio

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise KubellmError(f"{p}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    try:
        return [d for d in yamlio.load_all(text) if isinstance(d, dict)]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise KubellmError(f"{p}:{where} not valid YAML: {getattr(err, 'problem', err)}") from None


def check_all(named: Iterable[tuple[str, dict]]) -> tuple[list[Finding], int]:
    """Check ``(source, object)`` pairs; returns the findings (``where`` prefixed with the source) and
    the number of pod specs looked at."""
    findings: list[Finding] = []
    pods = 0
    for source, obj in named:
        pods += (
            len(pod_specs(obj))
            if obj.get("kind") != "List"
            else sum(len(pod_specs(i)) for i in obj.get("items") or [] if isinstance(i, dict))
        )
        findings += [Finding(f.rule, f.level, f.path, f.message, f"{source} {f.where}") for f in check(obj)]
    return findings, pods
