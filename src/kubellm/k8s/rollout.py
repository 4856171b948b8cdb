"""Roll an InferenceService out: create or patch, wait for Ready, smoke-test, promote or roll back.

The steps, with the official ``kubernetes`` client (``CustomObjectsApi``):

1. **Apply.** The spec we apply is remembered in the annotation ``kubellm.io/last-applied`` (kubectl's
   three-way apply, in small): an update is a JSON merge patch from that spec to the new one, so a field
   we stop setting is removed while the fields KServe's webhook defaults (resources, protocol) are left
   alone. When the remembered spec equals the new one and the live spec still holds it, nothing is
   patched: the same request twice changes nothing.
2. **Wait for Ready** (``status.conditions``) *of the new revision*: right after a patch the old
   revision's ``Ready=True`` is still there, so a newer ``latestCreatedRevision`` (Serverless) or
   ``observedGeneration`` (RawDeployment) must show KServe has seen the change. ``RevisionFailed`` or a
   model that ``FailedToLoad`` ends the wait early.
3. **Smoke** one request against the new revision: the canary's own URL (tag routing) when there is one,
   else ``status.url``. The check is an injectable ``smoke(url)`` that raises on failure.
4. **Promote** (drop ``canaryTrafficPercent``: the new revision takes 100 %) or **roll back**: canary
   traffic to 0 % at once, then the previous spec restored. A service created for the first time has no
   previous revision: failure then reports ``failed`` and leaves the object for inspection.

The deploy step that composes a rollout with promotion and the playground is
:func:`kubellm.stages.deploy.deploy`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from kubellm.errors import ServingError
from kubellm.k8s.inferenceservice import GROUP, MODEL_NAME_ANNOTATION, PLURAL, VERSION
from kubellm.log import get_logger

log = get_logger("kubellm.k8s.rollout")

#: Where the applied spec is remembered (canonical JSON, without ``canaryTrafficPercent``).
LAST_APPLIED = "kubellm.io/last-applied"
# Condition reasons after which waiting longer cannot help.
_FATAL_REASONS = {"RevisionFailed", "RevisionMissing"}


@dataclass(frozen=True)
class RolloutResult:
    """How a rollout ended."""

    status: Literal["promoted", "rolled_back", "failed"]
    """``promoted``: the new spec serves 100 %. ``rolled_back``: the previous spec is restored.
    ``failed``: a first deployment that never became healthy (nothing to roll back to)."""
    reason: str
    """One line: why (``ready and smoke test passed``, ``not Ready within 600 s``, the smoke error)."""
    url: str | None = None
    """``status.url`` of the InferenceService (external)."""
    revision: str | None = None
    """The predictor revision that serves now (``latestReadyRevision``), when KServe reports one."""
    changed: bool = True
    """False when the live InferenceService already had this spec and nothing was patched."""
    address: str | None = None
    """``status.address.url``: the cluster-local URL other pods (the playground) use."""


def rollout(
    isvc: dict,
    *,
    namespace: str,
    api_client: Any = None,
    timeout_s: float,
    poll_s: float = 2.0,
    smoke: Callable[[str], None] | None = None,
) -> RolloutResult:
    """Create or update ``isvc`` in ``namespace``, wait until the new revision is Ready, smoke-test it,
    then promote it or roll back to the previous spec.

    ``api_client`` is a ``kubernetes.client.ApiClient`` (default: in-cluster credentials or the
    kubeconfig). ``smoke(url)`` raises on an unhealthy answer; the default sends one OpenAI completion
    (:func:`http_smoke`). API errors raise :class:`~kubellm.errors.ClusterError`; an unhealthy revision is
    a result, not an exception.
    """
    from kubernetes import client

    from kubellm.k8s.client import api_errors, get_custom_object, load_api_client

    api = client.CustomObjectsApi(api_client or load_api_client())
    name = isvc["metadata"]["name"]
    smoke = smoke or http_smoke(isvc["metadata"].get("annotations", {}).get(MODEL_NAME_ANNOTATION, name))
    desired = copy.deepcopy(isvc)
    desired["metadata"]["namespace"] = namespace
    predictor = desired["spec"]["predictor"]
    canary = predictor.pop("canaryTrafficPercent", None)
    applied = _canonical(desired["spec"])
    desired["metadata"].setdefault("annotations", {})[LAST_APPLIED] = applied
    where = f"InferenceService {namespace}/{name}"

    def get() -> dict | None:
        return get_custom_object(api, (GROUP, VERSION, namespace, PLURAL, name), where)

    def patch(body: dict, what: str) -> dict:
        log.info("%s: %s", where, what)
        with api_errors(f"patch {where} ({what})"):
            return api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)

    current = get()
    if current is None:
        log.info("%s: creating", where)
        with api_errors(f"create {where}"):
            created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, desired)
        ok, reason, obj = _wait_and_smoke(get, smoke, created, None, timeout_s, poll_s, where)
        return _result("promoted" if ok else "failed", reason, obj)

    previous = _last_applied(current)
    if previous == desired["spec"] and spec_contains(current.get("spec", {}), desired["spec"]):
        log.info("%s: unchanged", where)
        ok, reason, obj = _wait_and_smoke(get, smoke, current, None, timeout_s, poll_s, where)
        return _result("promoted" if ok else "failed", reason, obj, changed=False)

    old_revision = _predictor_status(current).get("latestCreatedRevision")
    update = {
        "metadata": {key: dict(desired["metadata"].get(key) or {}) for key in ("labels", "annotations")},
        "spec": _merge_diff(previous, desired["spec"]),
    }
    if canary is not None:
        update["spec"].setdefault("predictor", {})["canaryTrafficPercent"] = canary
    patched = patch(update, f"updating ({canary}% canary)" if canary is not None else "updating")
    ok, reason, obj = _wait_and_smoke(get, smoke, patched, old_revision, timeout_s, poll_s, where)
    if ok:
        if canary is not None:
            obj = patch({"spec": {"predictor": {"canaryTrafficPercent": None}}}, "promoting the canary to 100%")
        return _result("promoted", reason, obj)

    if canary is not None:
        patch({"spec": {"predictor": {"canaryTrafficPercent": 0}}}, "canary traffic to 0%")
    restore = _merge_diff(desired["spec"], previous)
    restore.setdefault("predictor", {})["canaryTrafficPercent"] = None
    obj = patch(
        {"metadata": {key: _meta_restore(current, desired, key) for key in ("labels", "annotations")}, "spec": restore},
        "restoring the previous spec",
    )
    return _result("rolled_back", reason, obj)


def http_smoke(
    model_name: str,
    *,
    prompt: str = "Hello",
    max_tokens: int = 4,
    timeout_s: float = 60.0,
    url: str | None = None,
    api_path: str = "/openai/v1",
    cluster_local: bool = True,
) -> Callable[[str], None]:
    """A smoke check: one OpenAI completion against ``<url><api_path>/completions`` must come back 200
    with a choice. ``url`` replaces the InferenceService's URL (e.g. a port-forward). ``api_path`` is
    where the server keeps the OpenAI routes: KServe's ``/openai/v1`` (``kubellm serve``), vLLM's ``/v1``
    (an LLMInferenceService).

    KServe reports external URLs (``http://<svc>.<ns>.<domain>``), which a pipeline pod often cannot
    resolve (``example.com`` is Knative's default domain); Knative also answers the same service at
    ``<svc>.<ns>.svc.cluster.local``. So that form is tried first (unless ``cluster_local`` is false: a
    gateway URL whose path names the service), and the URL as reported when the cluster-local name does
    not connect (outside the cluster). An HTTP error is never retried elsewhere.
    """

    def check(isvc_url: str) -> None:
        import httpx

        body = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        local = _cluster_local(isvc_url) if cluster_local else None
        candidates = [url] if url else [u for u in (local, isvc_url) if u]
        for i, base in enumerate(candidates):
            target = base.rstrip("/") + api_path + "/completions"
            try:
                resp = httpx.post(target, json=body, timeout=timeout_s)
            except httpx.HTTPError as err:
                if i + 1 < len(candidates) and isinstance(err, httpx.ConnectError):
                    continue
                raise ServingError(f"smoke request to {target} failed: {type(err).__name__}: {err}") from None
            if resp.status_code != 200:
                raise ServingError(f"smoke request to {target}: HTTP {resp.status_code} {resp.text[:200]}")
            choices = resp.json().get("choices") or []
            if not choices or not isinstance(choices[0].get("text"), str):
                raise ServingError(f"smoke request to {target}: no completion in the answer {resp.text[:200]}")
            return

    return check


def _cluster_local(url: str) -> str | None:
    """``http://svc.ns.example.com/…`` → ``http://svc.ns.svc.cluster.local``; None for IPs, ``localhost``
    and names already cluster-local."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    labels = host.split(".")
    if len(labels) < 3 or host.endswith(".svc.cluster.local") or labels[-1].isdigit():
        return None
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{labels[0]}.{labels[1]}.svc.cluster.local{port}"


# --- waiting -----------------------------------------------------------------------------------------


def _wait_and_smoke(
    get: Callable[[], dict | None],
    smoke: Callable[[str], None],
    obj: dict,
    old_revision: str | None,
    timeout_s: float,
    poll_s: float,
    where: str,
) -> tuple[bool, str, dict]:
    """Wait for the new revision to be Ready, then smoke it: ``(ok, reason, last object seen)``."""
    generation = obj.get("metadata", {}).get("generation")
    deadline = time.monotonic() + timeout_s
    while True:
        failure = _fatal(obj)
        if failure:
            return False, failure, obj
        if _new_revision_ready(obj, generation, old_revision):
            break
        if time.monotonic() >= deadline:
            return False, f"not Ready within {timeout_s:g} s ({_ready_message(obj)})", obj
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
        fresh = get()
        if fresh is None:
            return False, f"{where} disappeared while waiting for it", obj
        obj = fresh
    url = _smoke_url(obj)
    if url is None:
        return False, "Ready but status has no URL to smoke-test", obj
    try:
        smoke(url)
    except Exception as err:  # any failure of the check is a failed rollout, with its message
        return False, f"smoke test failed: {' '.join(str(err).split()) or type(err).__name__}", obj
    return True, "ready and smoke test passed", obj


def _new_revision_ready(obj: dict, generation: int | None, old_revision: str | None) -> bool:
    status = obj.get("status") or {}
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return False  # KServe has not reconciled our change yet
    pred = _predictor_status(obj)
    created, ready = pred.get("latestCreatedRevision"), pred.get("latestReadyRevision")
    if old_revision is not None and created is not None and created == old_revision:
        return False  # the new revision does not exist yet
    if created is not None and ready != created:
        return False
    return _condition(obj, "Ready").get("status") == "True"


def _fatal(obj: dict) -> str | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "False" and cond.get("reason") in _FATAL_REASONS:
            return f"{cond.get('type')}: {cond.get('reason')}: {cond.get('message', '')}".strip()
    model = (obj.get("status") or {}).get("modelStatus") or {}
    if (model.get("states") or {}).get("targetModelState") == "FailedToLoad":
        info = model.get("lastFailureInfo") or {}
        return f"model failed to load: {info.get('reason', '')} {info.get('message', '')}".strip()
    return None


def _condition(obj: dict, kind: str) -> dict:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return {}


def _ready_message(obj: dict) -> str:
    cond = _condition(obj, "Ready")
    if not cond:
        return "no Ready condition yet"
    return f"Ready={cond.get('status')} {cond.get('reason', '')} {cond.get('message', '')}".strip()


def _predictor_status(obj: dict) -> dict:
    return ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}


def _smoke_url(obj: dict) -> str | None:
    """The newest revision's own URL (tag ``latest``) during a canary, else the service URL."""
    for entry in _predictor_status(obj).get("traffic") or []:
        if entry.get("tag") == "latest" and entry.get("url"):
            return entry["url"]
    return (obj.get("status") or {}).get("url")


def _result(
    status: Literal["promoted", "rolled_back", "failed"], reason: str, obj: dict, changed: bool = True
) -> RolloutResult:
    st = obj.get("status") or {}
    return RolloutResult(
        status=status,
        reason=reason,
        url=st.get("url"),
        revision=_predictor_status(obj).get("latestReadyRevision"),
        changed=changed,
        address=(st.get("address") or {}).get("url"),
    )


# --- three-way apply ---------------------------------------------------------------------------------


def _canonical(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _last_applied(obj: dict) -> dict:
    """The spec we applied last time; an object someone else created counts as its live spec."""
    raw = (obj.get("metadata", {}).get("annotations") or {}).get(LAST_APPLIED)
    if raw:
        try:
            return json.loads(raw)
        except ValueError:
            pass  # hand-edited annotation: fall back to the live spec
    spec = copy.deepcopy(obj.get("spec") or {})
    spec.get("predictor", {}).pop("canaryTrafficPercent", None)
    return spec


def _merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) turning ``old`` into ``new``: changed keys, ``None`` for removed."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            patch[key] = _merge_diff(old[key], value)
    return patch


def spec_contains(live: Any, wanted: Any) -> bool:
    """Whether the live value holds everything in ``wanted`` (extra keys are the webhook's defaults)."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(k in live and spec_contains(live[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return (
            isinstance(live, list)
            and len(live) == len(wanted)
            and all(spec_contains(a, b) for a, b in zip(live, wanted, strict=True))
        )
    return live == wanted


def _meta_restore(current: dict, desired: dict, key: str) -> dict:
    """Our ``labels``/``annotations`` back to their values before the update (new ones removed);
    foreign ones (KServe's, a user's) are never touched."""
    before = current.get("metadata", {}).get(key) or {}
    return {name: before.get(name) for name in (desired["metadata"].get(key) or {})}
