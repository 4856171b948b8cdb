"""KServe's LLMInferenceService (``serving.kserve.io/v1alpha2``, KServe 0.20): one base, LoRA adapters on it.

``deploy.runtime: llm-inference-service``. KServe runs vLLM workloads behind llm-d's router for this
resource and serves LoRA adapters on the one shared base (``spec.model.lora.adapters``): a release is an
adapter of megabytes, not a predictor with a full model copy.

:func:`build_llm_inference_service` is a pure function from the run config to the manifest:
``spec.model.uri`` the base (``name`` its served name), ``spec.model.lora`` the adapters with ``maxRank``
and ``maxAdapters``, ``replicas`` (fixed) or ``scaling`` (``deploy.min/max_replicas``), the vLLM pod
``template`` (container ``main``, the name KServe's presets merge into) with the deploy stage's placement,
the restricted security context of :mod:`kubellm.k8s.pods` and probes on vLLM's ``/health`` (HTTPS on
8000, as KServe's presets serve it) with a startup window of ``deploy.startup_timeout_s``, and the
``router`` with a managed route and gateway, plus llm-d's scheduler unless ``deploy.router_scheduler`` is
off. Generated objects are validated against the vendored CRD (:mod:`kubellm.k8s.schema`).

The adapter names clients use:

- the **alias** (``serve.model_name``): the adapter entry clients call; it points at the champion's URI;
- ``<alias>-v<version>``: a candidate under its own name while it is gated.

:func:`adapter_rollout` releases a candidate on the live service:

0. **refuse** a live service on another base (``spec.model.uri``): the adapter would not load there;
1. **add** the candidate's entry (``<alias>-v<N>``) to ``spec.model.lora.adapters``;
2. **wait** until KServe has reconciled that spec (``status.observedGeneration`` reaches the patched
   ``metadata.generation``) and the service is ``Ready`` (``WorkloadsReady`` and ``RouterReady``);
3. **gate** the candidate *by name* on the live service: the smoke request, then (optionally) the
   served benchmark gate, each an injectable callable ``(url, adapter_name)`` that raises on failure;
4. **promote**: the alias entry takes the candidate's URI, the candidate's own entry goes, and the
   annotation ``kubellm.io/champion-version`` records the version — only forward: when a newer version
   was promoted meanwhile, the candidate is removed and the result is ``superseded``;
   or **roll back**: the candidate's entry is removed, nothing else changes (the champion keeps serving).

Every change is a read-modify-write carrying ``metadata.resourceVersion`` (a JSON merge patch replaces a
list whole; the precondition makes the API server answer 409 when someone changed the object meanwhile,
and the change is recomputed on the fresh object): two candidates released at once both land in the
list, and each removes only its own entry.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kubellm.errors import ServingError
from kubellm.k8s import pods
from kubellm.k8s.inferenceservice import (
    MODEL_NAME_ANNOTATION,
    VISIBILITY_LABEL,
    _predictor_placement,
    isvc_name,
    workload_labels,
)
from kubellm.k8s.rollout import _condition
from kubellm.log import get_logger

if TYPE_CHECKING:
    from kubellm.config.run import RunConfig

log = get_logger("kubellm.k8s.llmisvc")

GROUP = "serving.kserve.io"
VERSION = "v1alpha2"
PLURAL = "llminferenceservices"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMInferenceService"
#: The container KServe's LLMInferenceServiceConfig presets name and merge ours into.
CONTAINER = "main"
#: vLLM's port in KServe's presets (HTTPS with the certificates KServe mounts).
VLLM_PORT = 8000
#: The registry version whose adapter the alias entry serves.
CHAMPION_VERSION_ANNOTATION = "kubellm.io/champion-version"
# How often a read-modify-write is retried on 409 Conflict before giving up.
_CAS_TRIES = 20


def candidate_name(alias: str, version: int | str) -> str:
    """The adapter name a candidate is gated under: ``<alias>-v<version>``."""
    return f"{alias}-v{version}"


def build_llm_inference_service(
    run_cfg: RunConfig,
    base_uri: str,
    adapters: Mapping[str, str],
    *,
    max_rank: int | None = None,
    champion_version: int | None = None,
    model_version: int | str | None = None,
) -> dict[str, Any]:
    """The LLMInferenceService serving the base at ``base_uri`` and ``adapters`` (name → URI) on it.

    ``max_rank``: the largest rank of the adapters when known (else ``serve.max_lora_rank``);
    ``maxAdapters`` is ``serve.max_adapters`` (room for candidates beside the alias).
    ``champion_version`` is recorded as :data:`CHAMPION_VERSION_ANNOTATION`.
    """
    deploy, serve = run_cfg.deploy, run_cfg.serve
    if not base_uri:
        raise ServingError("llm-inference-service: no base model location (spec.model.uri) to deploy")
    if len(adapters) > serve.max_adapters:
        raise ServingError(
            f"llm-inference-service: {len(adapters)} adapters, more than serve.max_adapters ({serve.max_adapters})"
        )
    name = isvc_name(run_cfg)
    placement = _predictor_placement(run_cfg)
    main = pods.container(CONTAINER, deploy.vllm_image or "", placement)
    if not deploy.vllm_image:
        del main["image"]  # the preset's image
    main.update(_probes(deploy.startup_timeout_s))
    template = pods.pod_spec([main], placement, run_cfg.platform)
    lora: dict[str, Any] = {
        "adapters": [{"name": n, "uri": u} for n, u in adapters.items()],
        "maxRank": max_rank or serve.max_lora_rank,
        "maxAdapters": serve.max_adapters,
    }
    spec: dict[str, Any] = {"model": {"uri": base_uri, "name": f"{serve.model_name}-base", "lora": lora}}
    if deploy.min_replicas == deploy.max_replicas:
        spec["replicas"] = deploy.min_replicas
    else:
        spec["scaling"] = {"minReplicas": max(1, deploy.min_replicas), "maxReplicas": deploy.max_replicas}
    spec["template"] = template
    router: dict[str, Any] = {"route": {}, "gateway": {}}
    if deploy.router_scheduler:
        router["scheduler"] = {}
    spec["router"] = router

    labels = workload_labels(run_cfg, name, "llm-inference-service", model_version, placement, spec)
    if deploy.visibility == "cluster-local":
        labels = {**labels, VISIBILITY_LABEL: "cluster-local"}
    annotations = {MODEL_NAME_ANNOTATION: serve.model_name}
    if champion_version is not None:
        annotations[CHAMPION_VERSION_ANNOTATION] = str(champion_version)
    metadata = {"name": name, "namespace": run_cfg.platform.namespace, "labels": labels, "annotations": annotations}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def _probes(startup_timeout_s: int) -> dict[str, Any]:
    """vLLM's ``/health`` (HTTPS, as KServe's presets serve it): a startup window for the model load,
    then readiness and liveness with short periods."""

    def http(period: int, failures: int, timeout: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": "/health", "port": VLLM_PORT, "scheme": "HTTPS"},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": timeout,
        }

    return {
        "startupProbe": http(10, -(-startup_timeout_s // 10), 5),
        "readinessProbe": http(10, 3, 5),
        "livenessProbe": http(30, 3, 10),
    }


# --- the adapter rollout -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterRolloutResult:
    """How an adapter release ended."""

    status: Literal["promoted", "rolled_back", "failed", "superseded"]
    """``promoted``: the alias serves the candidate. ``rolled_back``: the candidate was removed, the
    champion unchanged. ``failed``: the same for a service that had no champion yet. ``superseded``: the
    candidate passed but a newer version was promoted meanwhile (removed, nothing moved)."""
    reason: str
    url: str | None = None
    adapters: list[str] = field(default_factory=list)
    """Adapter names the service lists after the release."""


def adapter_rollout(
    desired: dict,
    *,
    candidate_uri: str,
    version: int,
    namespace: str,
    api_client: Any = None,
    timeout_s: float,
    poll_s: float = 2.0,
    smoke: Callable[[str, str], None],
    gate: Callable[[str, str], None] | None = None,
) -> AdapterRolloutResult:
    """Release the adapter at ``candidate_uri`` (registry ``version``) on the LLMInferenceService
    ``desired`` describes (created from it when absent): add, wait, gate by name, promote or remove
    (see the module doc). API errors raise :class:`~kubellm.errors.ClusterError`; an unhealthy candidate
    is a result."""
    from kubernetes import client

    from kubellm.k8s.client import api_errors, get_custom_object, load_api_client

    api = client.CustomObjectsApi(api_client or load_api_client())
    name = desired["metadata"]["name"]
    alias = desired["metadata"]["annotations"][MODEL_NAME_ANNOTATION]
    candidate = candidate_name(alias, version)
    where = f"LLMInferenceService {namespace}/{name}"

    def get() -> dict | None:
        return get_custom_object(api, (GROUP, VERSION, namespace, PLURAL, name), where)

    def change(what: str, edit: Callable[[dict], dict | None]) -> dict:
        """Apply ``edit(live) -> merge patch`` with the live resourceVersion as precondition, again on 409."""
        for _ in range(_CAS_TRIES):
            live = get()
            if live is None:
                raise ServingError(f"{where} disappeared during the release")
            patch = edit(live)
            if patch is None:
                return live
            patch.setdefault("metadata", {})["resourceVersion"] = live["metadata"].get("resourceVersion")
            log.info("%s: %s", where, what)
            with api_errors(f"patch {where} ({what})"):
                try:
                    return api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
                except client.ApiException as err:
                    if err.status != 409:
                        raise
        raise ServingError(f"{where}: {what}: still conflicting after {_CAS_TRIES} tries")

    body = copy.deepcopy(desired)
    body["metadata"]["namespace"] = namespace
    live = get()
    if live is None:
        log.info("%s: creating", where)
        with api_errors(f"create {where}"):
            try:
                api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            except client.ApiException as err:
                if err.status != 409:  # created meanwhile by a concurrent release: go on with it
                    raise
    else:
        serving, wanted = (((live.get("spec") or {}).get("model") or {}).get("uri"), desired["spec"]["model"]["uri"])
        if serving != wanted:  # an adapter only loads on the base it was trained on: change nothing
            raise ServingError(
                f"{where} serves base {serving}, not {wanted}, the base of adapter {candidate}; "
                "release it on a service of that base (deploy.name)"
            )

    entry = {"name": candidate, "uri": candidate_uri}
    patched = change(
        f"adding candidate adapter {candidate}",
        lambda live: (
            None
            if any(a.get("name") == candidate for a in _adapters(live))
            else _with_adapters([*_adapters(live), entry])
        ),
    )
    ok, reason, obj = _wait_ready(get, patched, timeout_s, poll_s, where)
    url = (obj.get("status") or {}).get("url")
    if ok and not url:
        ok, reason = False, "Ready but status has no URL to send the candidate's requests to"
    if ok:
        for label, check in (("smoke test", smoke), ("benchmark gate", gate)):
            if check is None:
                continue
            try:
                check(url, candidate)
            except Exception as err:  # any failure of a check fails the release, with its message
                ok, reason = False, f"{label} of adapter {candidate} failed: {' '.join(str(err).split())}"
                break
        else:
            reason = f"adapter {candidate} ready and gated on the live service"

    if ok:
        outcome: dict[str, Any] = {}

        def promote(live: dict) -> dict:
            held = (live["metadata"].get("annotations") or {}).get(CHAMPION_VERSION_ANNOTATION)
            rest = [a for a in _adapters(live) if a.get("name") != candidate]
            if held is not None and held.isdigit() and int(held) > version:
                outcome["superseded"] = int(held)
                return _with_adapters(rest)
            outcome.pop("superseded", None)
            others = [a for a in rest if a.get("name") != alias]
            patch = _with_adapters([{"name": alias, "uri": candidate_uri}, *others])
            patch["metadata"] = {"annotations": {CHAMPION_VERSION_ANNOTATION: str(version)}}
            return patch

        obj = change(f"promoting {candidate} to {alias}", promote)
        if "superseded" in outcome:
            return _result("superseded", f"{reason}, but version {outcome['superseded']} was promoted meanwhile", obj)
        return _result("promoted", reason, obj)

    had_champion = any(a.get("name") == alias for a in _adapters(obj))
    obj = change(
        f"removing candidate adapter {candidate}",
        lambda live: _with_adapters([a for a in _adapters(live) if a.get("name") != candidate]),
    )
    return _result("rolled_back" if had_champion else "failed", reason, obj)


def _adapters(obj: dict) -> list[dict]:
    return list((((obj.get("spec") or {}).get("model") or {}).get("lora") or {}).get("adapters") or [])


def _with_adapters(adapters: list[dict]) -> dict:
    """The merge patch setting the adapter list (a list is replaced whole)."""
    return {"spec": {"model": {"lora": {"adapters": adapters}}}}


def _wait_ready(
    get: Callable[[], dict | None], obj: dict, timeout_s: float, poll_s: float, where: str
) -> tuple[bool, str, dict]:
    """Until KServe reconciled ``obj``'s generation and reports Ready: ``(ok, reason, last seen)``."""
    generation = (obj.get("metadata") or {}).get("generation")
    deadline = time.monotonic() + timeout_s
    while True:
        status = obj.get("status") or {}
        observed = status.get("observedGeneration")
        reconciled = generation is None or (observed is not None and observed >= generation)
        if reconciled and _condition(obj, "Ready").get("status") == "True":
            return True, "ready", obj
        if time.monotonic() >= deadline:
            parts = [
                f"{kind}={c.get('status')} {c.get('reason', '')}".strip()
                for kind in ("WorkloadsReady", "RouterReady", "Ready")
                if (c := _condition(obj, kind))
            ]
            seen = "; ".join(parts) or "no conditions yet"
            if not reconciled:
                seen = f"generation {generation} not observed yet (observed {observed}); {seen}"
            return False, f"not Ready within {timeout_s:g} s ({seen})", obj
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
        fresh = get()
        if fresh is None:
            return False, f"{where} disappeared while waiting for it", obj
        obj = fresh


def _result(
    status: Literal["promoted", "rolled_back", "failed", "superseded"], reason: str, obj: dict
) -> AdapterRolloutResult:
    return AdapterRolloutResult(
        status, reason, (obj.get("status") or {}).get("url"), [a.get("name") for a in _adapters(obj)]
    )
