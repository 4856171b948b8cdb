"""What ``kubellm check`` finds in a *compiled pipeline* (KFP's IR YAML), which is not a Kubernetes object:
each executor's container (image, command, resources) from the pipeline spec and its pod settings (security
context, volumes) from the kfp-kubernetes platform spec that follows it in the same file.

KFP's backend turns each executor into a pod whose container keeps the compiler's image and command, with
KFP adding ``allowPrivilegeEscalation: false``, ``capabilities: drop ALL`` and the RuntimeDefault seccomp
profile itself; what a compiled file decides, and this module checks, is the rest:

- an executor that ``pip install``s when its pod starts (a plain ``@dsl.component``): on kubellm's pods the
  root filesystem is read-only and the cluster may have no package index, so it fails at start;
- an image left at KFP's default (``python:3.x``) instead of an image with kubellm in it;
- no pod security context (``runAsNonRoot`` with a numeric user) from the platform spec;
- no memory limit on a training executor is not a finding: limits come from ``platform.stages``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubellm.k8s.podsecurity import Finding


def is_pipeline_spec(doc: Mapping[str, Any]) -> bool:
    """A compiled KFP pipeline (or component) spec: the IR's top-level keys, no ``kind``."""
    return "kind" not in doc and "deploymentSpec" in doc and ("root" in doc or "components" in doc)


def executors(doc: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``exec-name`` → its container (image, command, args, resources)."""
    found = (doc.get("deploymentSpec") or {}).get("executors") or {}
    return {name: ex["container"] for name, ex in found.items() if isinstance(ex, Mapping) and "container" in ex}


def _platform(docs: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    for doc in docs:
        k8s = ((doc.get("platforms") or {}).get("kubernetes") or {}).get("deploymentSpec") or {}
        if k8s:
            return dict(k8s.get("executors") or {})
    return {}


def check_pipeline_file(docs: list[Mapping[str, Any]], source: str) -> tuple[list[Finding], int]:
    """Findings for every executor of the compiled pipelines among ``docs`` (one file's documents), and
    how many executors were inspected."""
    findings: list[Finding] = []
    platform = _platform(docs)
    count = 0
    for doc in docs:
        if not is_pipeline_spec(doc):
            continue
        name = (doc.get("pipelineInfo") or {}).get("name", "?")
        for exec_name, container in sorted(executors(doc).items()):
            count += 1
            where = f"{source} pipeline/{name}"
            path = f"deploymentSpec.executors.{exec_name}"
            findings += [
                Finding(rule, "kubellm", f"{path}.{field}", msg, where)
                for rule, field, msg in _container_problems(container)
            ]
            if _is_component_file(doc) and not platform:
                continue  # a component compiled on its own: the pipeline that places it decides its pod
            pod = platform.get(exec_name) or {}
            sc = pod.get("securityContext") or {}
            if not sc.get("runAsNonRoot") or not str(sc.get("runAsUser", "")).isdigit():
                findings.append(
                    Finding(
                        "runAsNonRoot",
                        "restricted",
                        f"platforms.kubernetes.{path}.securityContext",
                        "no runAsNonRoot with a numeric runAsUser: the pod runs as the image's "
                        "user (place the task with Builder.step or Builder.place)",
                        where,
                    )
                )
    return findings, count


def _is_component_file(doc: Mapping[str, Any]) -> bool:
    """``kubellm compile``'s ``components/NAME.yaml``: one component wrapped as a one-task pipeline."""
    comps = list(doc.get("components") or {})
    return comps == [f"comp-{(doc.get('pipelineInfo') or {}).get('name')}"]


def _container_problems(container: Mapping[str, Any]) -> Iterable[tuple[str, str, str]]:
    command = " ".join(str(c) for c in [*(container.get("command") or []), *(container.get("args") or [])])
    if "pip install" in command:
        yield (
            "install-at-start",
            "command",
            "installs packages when the pod starts (a plain @dsl.component); the root filesystem is "
            "read-only: decorate it with kubellm.pipelines.api.component",
        )
    image = str(container.get("image", ""))
    if not image or image.startswith("python:"):
        yield (
            "image",
            "image",
            f"image {image or '(none)'!r} has no kubellm in it: place the task with "
            "Builder.place (platform.image) or give the component kubellm's image",
        )
