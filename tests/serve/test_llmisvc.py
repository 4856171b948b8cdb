"""KServe's LLMInferenceService (issue 22): the manifest against the vendored v1alpha2 CRD and Pod Security,
and the adapter rollout against a fake API server that is as strict as a real one where the rollout
depends on it, with the tests playing KServe's controller (status conditions ``WorkloadsReady``,
``RouterReady``, ``Ready``).

kmock's emulator neither bumps ``metadata.generation`` nor checks ``metadata.resourceVersion``; the real
API server does both, and the rollout relies on both (waiting for the reconciled generation; no lost
update when two releases edit the adapter list). :class:`StrictEmulator` adds them."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest

from kubellm.errors import ServingError
from kubellm.k8s import podsecurity
from kubellm.k8s.inferenceservice import MODEL_NAME_ANNOTATION
from kubellm.k8s.llmisvc import (
    CHAMPION_VERSION_ANNOTATION,
    GROUP,
    PLURAL,
    VERSION,
    adapter_rollout,
    build_llm_inference_service,
    candidate_name,
)
from kubellm.k8s.schema import validate_against_crd

NS = "serving"
POLL = 0.02
BASE = "s3://models/base-v1"
URIS = {v: f"s3://models/adapter-v{v}" for v in range(1, 5)}


def _cfg(make_cfg, *overrides: str):
    return make_cfg("deploy.runtime=llm-inference-service", "deploy.name=chat", "serve.model_name=support", *overrides)


# --- the manifest ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", [True, False])
def test_manifest_validates_against_the_crd_and_pod_security(make_cfg, scheduler: bool) -> None:
    cfg = _cfg(
        make_cfg,
        f"deploy.router_scheduler={str(scheduler).lower()}",
        "deploy.min_replicas=1",
        "deploy.max_replicas=3",
        "platform.default.resources.gpus=1",
        "deploy.vllm_image=vllm/vllm-openai:v0.11",
    )
    obj = build_llm_inference_service(
        cfg, BASE, {"support": URIS[1], "support-v2": URIS[2]}, max_rank=16, champion_version=1
    )
    assert validate_against_crd(obj) == []
    assert podsecurity.check(obj) == []
    spec = obj["spec"]
    assert obj["apiVersion"] == "serving.kserve.io/v1alpha2" and obj["kind"] == "LLMInferenceService"
    assert spec["model"]["uri"] == BASE and spec["model"]["name"] == "support-base"
    assert spec["model"]["lora"] == {
        "adapters": [{"name": "support", "uri": URIS[1]}, {"name": "support-v2", "uri": URIS[2]}],
        "maxRank": 16,
        "maxAdapters": 16,
    }
    assert spec["scaling"] == {"minReplicas": 1, "maxReplicas": 3} and "replicas" not in spec
    assert ("scheduler" in spec["router"]) is scheduler and {"route", "gateway"} <= set(spec["router"])
    main = spec["template"]["containers"][0]
    assert main["name"] == "main" and main["image"] == "vllm/vllm-openai:v0.11"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["startupProbe"]["httpGet"] == {"path": "/health", "port": 8000, "scheme": "HTTPS"}
    assert spec["template"]["tolerations"][0]["key"] == "dedicated"  # the deploy stage's placement
    assert obj["metadata"]["annotations"][CHAMPION_VERSION_ANNOTATION] == "1"


def test_fixed_replicas_and_the_preset_image(make_cfg) -> None:
    obj = build_llm_inference_service(_cfg(make_cfg, "deploy.min_replicas=2", "deploy.max_replicas=2"), BASE, {})
    assert obj["spec"]["replicas"] == 2 and "scaling" not in obj["spec"]
    assert "image" not in obj["spec"]["template"]["containers"][0]  # KServe's preset provides it
    assert obj["spec"]["model"]["lora"]["maxRank"] == 64  # serve.max_lora_rank when the ranks are unknown
    assert validate_against_crd(obj) == []


def test_the_schema_catches_what_the_api_server_would_refuse(make_cfg) -> None:
    obj = build_llm_inference_service(_cfg(make_cfg), BASE, {"support": URIS[1]})
    obj["spec"]["model"]["lora"]["maxRanks"] = 8  # a typo
    obj["spec"]["router"]["scheduler"]["replicas"] = "two"
    errors = validate_against_crd(obj)
    assert any(e.startswith("spec.model.lora: ") and "maxRanks" in e for e in errors), errors
    assert any(e.startswith("spec.router.scheduler.replicas: ") for e in errors), errors


def test_kubellm_check_validates_the_generated_service(make_cfg) -> None:
    from kubellm.k8s.manifests import generated_manifests
    from kubellm.k8s.schema import validate_custom_resources

    named = [(label, obj) for label, obj in generated_manifests(make_cfg()) if obj["kind"] == "LLMInferenceService"]
    assert [label for label, _ in named] == [
        "generated llminferenceservice (with the llm-d scheduler)",
        "generated llminferenceservice (without the llm-d scheduler)",
    ]
    findings, pods = podsecurity.check_all(named)
    assert findings == [] and pods == 2
    assert validate_custom_resources(named) == []
    broken = [(label, {**obj, "spec": {**obj["spec"], "replicas": -1}}) for label, obj in named[:1]]
    assert any("spec.replicas" in str(f) for f in validate_custom_resources(broken))


# --- a stricter fake API server and KServe's controller -----------------------------------------------


def strict_emulator() -> Any:
    """kmock's emulator plus what the real API server does and the rollout relies on: ``resourceVersion``
    on every change and as a precondition of updates (409 when stale), ``generation`` bumped when the
    spec changes."""
    import kmock
    from kmock._internal.k8s import KubernetesObjectConflictError

    versions = itertools.count(1)

    class StrictEmulator(kmock.KubernetesEmulator):
        async def _handle(self, request: Any) -> Any:
            if request.resource is not None and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                if request.action == kmock.action.CREATE:
                    meta.update(resourceVersion=str(next(versions)), generation=1)
                elif request.action == kmock.action.UPDATE and request.name is not None:
                    key = (request.resource, request.namespace, request.name)
                    obj = self._objects[key] if key in self._objects else None  # noqa: SIM401 - no .get()
                    if obj is not None and not obj.deleted:
                        live = obj.raw
                        wanted = meta.get("resourceVersion")
                        if wanted is not None and wanted != live["metadata"].get("resourceVersion"):
                            raise KubernetesObjectConflictError()
                        meta["resourceVersion"] = str(next(versions))
                        if request.subresource != "status" and "spec" in request.data:
                            meta["generation"] = live["metadata"].get("generation", 1) + 1
            return await super()._handle(request)

    return StrictEmulator


@pytest.fixture()
def api(fake_api_server):
    """A strict fake API server (see :func:`strict_emulator`) and its client."""
    with fake_api_server(strict_emulator()) as server:
        yield server.api_client()


class FakeLLMKServe(threading.Thread):
    """Plays KServe's LLMInferenceService controller: a new generation is first reported not ready, then
    ``WorkloadsReady``, ``RouterReady`` and ``Ready`` True with ``observedGeneration``, unless an adapter in
    ``broken`` is in the spec (its workloads never become ready, as when vLLM cannot load it)."""

    def __init__(self, api_client: Any, name: str, broken: set[str] = frozenset(), url: str | None = None) -> None:
        super().__init__(daemon=True)
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.name, self.broken = name, set(broken)
        self.url = url or f"http://{name}.{NS}.example.com"
        """``status.url`` once Ready: where the router answers (a local endpoint for the deploy stage)."""
        self.seen: list[list[str]] = []
        """The adapter names of every generation reconciled."""
        self._stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        last = None
        try:
            while not self._stop_event.is_set():
                try:
                    obj = self.api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, self.name)
                except ApiException as err:
                    if err.status != 404:
                        raise
                    obj = None
                if obj is not None and obj["metadata"]["generation"] != last:
                    last = obj["metadata"]["generation"]
                    self._reconcile(obj, last)
                time.sleep(POLL)
        except BaseException as err:  # reported by finish()
            self.error = err

    def _status(self, status: dict) -> None:
        self.api.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, self.name, {"status": status})

    def _reconcile(self, obj: dict, generation: int) -> None:
        names = [a["name"] for a in obj["spec"]["model"]["lora"]["adapters"]]
        self.seen.append(names)
        self._status(
            {
                "observedGeneration": generation,
                "conditions": [
                    {"type": "WorkloadsReady", "status": "False", "reason": "Progressing"},
                    {"type": "RouterReady", "status": "True"},
                    {"type": "Ready", "status": "False", "reason": "Progressing"},
                ],
            }
        )
        time.sleep(POLL * 3)
        broken = sorted(self.broken & set(names))
        workloads = (
            {
                "type": "WorkloadsReady",
                "status": "False",
                "reason": "MinimumReplicasUnavailable",
                "message": f"vLLM failed to load adapter {broken[0]}",
            }
            if broken
            else {"type": "WorkloadsReady", "status": "True"}
        )
        ready = "False" if broken else "True"
        self._status(
            {
                "observedGeneration": generation,
                "url": self.url,
                "conditions": [
                    workloads,
                    {"type": "RouterReady", "status": "True"},
                    {"type": "Ready", "status": ready},
                ],
            }
        )

    def finish(self) -> None:
        self._stop_event.set()
        self.join(10)
        assert self.error is None, self.error


class Gate:
    """A smoke or benchmark check recording ``(url, adapter)`` calls and the adapter list live at the time;
    raises for the adapters in ``failing``."""

    def __init__(self, api_client: Any, failing: set[str] = frozenset(), delay_s: float = 0.0) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.failing, self.delay_s = set(failing), delay_s
        self.calls: list[tuple[str, str]] = []
        self.live: list[list[str]] = []

    def __call__(self, url: str, adapter: str) -> None:
        self.calls.append((url, adapter))
        obj = self.api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "chat")
        self.live.append([a["name"] for a in obj["spec"]["model"]["lora"]["adapters"]])
        time.sleep(self.delay_s)
        if adapter in self.failing:
            raise RuntimeError(f"HTTP 500 from {adapter}")


def _existing(api_client: Any, make_cfg) -> dict:
    """The service as a previous release left it: the alias serving version 1."""
    from kubernetes import client

    desired = build_llm_inference_service(_cfg(make_cfg), BASE, {"support": URIS[1]}, champion_version=1)
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, {**desired, "metadata": {**desired["metadata"], "namespace": NS}}
    )
    return desired


def _live(api_client: Any) -> dict:
    from kubernetes import client

    return client.CustomObjectsApi(api_client).get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "chat")


def _release(
    api_client: Any, desired: dict, version: int, smoke: Gate, gate: Gate | None = None, timeout_s: float = 10.0
):
    return adapter_rollout(
        desired,
        candidate_uri=URIS[version],
        version=version,
        namespace=NS,
        api_client=api_client,
        timeout_s=timeout_s,
        poll_s=POLL,
        smoke=smoke,
        gate=gate,
    )


def _adapters(obj: dict) -> list[tuple[str, str]]:
    return [(a["name"], a["uri"]) for a in obj["spec"]["model"]["lora"]["adapters"]]


@pytest.mark.integration
def test_healthy_candidate_is_gated_by_name_and_promoted(api, make_cfg) -> None:
    desired = _existing(api, make_cfg)
    kserve = FakeLLMKServe(api, "chat")
    kserve.start()
    smoke, bench = Gate(api), Gate(api)
    try:
        result = _release(api, desired, 2, smoke, bench)
    finally:
        kserve.finish()
    assert result.status == "promoted", result.reason
    url = "http://chat.serving.example.com"
    assert smoke.calls == [(url, "support-v2")] and bench.calls == [(url, "support-v2")]
    assert smoke.live == [["support", "support-v2"]]  # gated while the champion kept serving
    live = _live(api)
    assert _adapters(live) == [("support", URIS[2])] and result.adapters == ["support"]
    assert live["metadata"]["annotations"][CHAMPION_VERSION_ANNOTATION] == "2"
    assert live["spec"]["model"]["uri"] == BASE  # the base was never touched
    assert validate_against_crd({**live, "status": {}}) == []


@pytest.mark.integration
@pytest.mark.parametrize("failing", ["smoke", "benchmark"])
def test_failing_gate_removes_the_candidate_and_leaves_the_champion(api, make_cfg, failing: str) -> None:
    desired = _existing(api, make_cfg)
    kserve = FakeLLMKServe(api, "chat")
    kserve.start()
    smoke = Gate(api, {"support-v2"} if failing == "smoke" else set())
    bench = Gate(api, {"support-v2"} if failing == "benchmark" else set())
    try:
        result = _release(api, desired, 2, smoke, bench)
        # the rollback's edit is reconciled by the controller's next poll: wait for it (bounded)
        deadline = time.monotonic() + 30
        while (not kserve.seen or kserve.seen[-1] != ["support"]) and time.monotonic() < deadline:
            time.sleep(POLL)
    finally:
        kserve.finish()
    assert result.status == "rolled_back"
    assert (
        result.reason == f"{failing} {'test' if failing == 'smoke' else 'gate'} of adapter support-v2 failed: "
        "HTTP 500 from support-v2"
    )
    live = _live(api)
    assert _adapters(live) == [("support", URIS[1])]
    assert live["metadata"]["annotations"][CHAMPION_VERSION_ANNOTATION] == "1"
    assert kserve.seen[-1] == ["support"]


@pytest.mark.integration
def test_a_candidate_that_never_gets_ready_is_rolled_back(api, make_cfg) -> None:
    desired = _existing(api, make_cfg)
    kserve = FakeLLMKServe(api, "chat", broken={"support-v2"})
    kserve.start()
    smoke = Gate(api)
    try:
        result = _release(api, desired, 2, smoke, timeout_s=1.0)
    finally:
        kserve.finish()
    assert result.status == "rolled_back" and smoke.calls == []
    assert (
        "not Ready within 1 s" in result.reason and "WorkloadsReady=False MinimumReplicasUnavailable" in result.reason
    )
    assert _adapters(_live(api)) == [("support", URIS[1])]


@pytest.mark.integration
def test_first_release_creates_the_service(api, make_cfg) -> None:
    desired = build_llm_inference_service(_cfg(make_cfg), BASE, {})
    kserve = FakeLLMKServe(api, "chat")
    kserve.start()
    try:
        result = _release(api, desired, 1, Gate(api))
        failed = _release(api, desired, 2, Gate(api, {"support-v2"}))
    finally:
        kserve.finish()
    assert result.status == "promoted" and failed.status == "rolled_back"
    live = _live(api)
    assert _adapters(live) == [("support", URIS[1])]
    assert live["metadata"]["annotations"][MODEL_NAME_ANNOTATION] == "support"


@pytest.mark.integration
def test_first_release_that_fails_reports_failed(api, make_cfg) -> None:
    desired = build_llm_inference_service(_cfg(make_cfg), BASE, {})
    kserve = FakeLLMKServe(api, "chat")
    kserve.start()
    try:
        result = _release(api, desired, 1, Gate(api, {"support-v1"}))
    finally:
        kserve.finish()
    assert result.status == "failed" and _adapters(_live(api)) == []


@pytest.mark.integration
@pytest.mark.parametrize("v2_passes", [False, True])
def test_two_candidates_racing(api, make_cfg, v2_passes: bool) -> None:
    """Versions 2 and 3 are released at once: both are added (no lost update), each is gated by its own
    name, each removes only itself, and the alias ends on the newest version that passed."""
    desired = _existing(api, make_cfg)
    kserve = FakeLLMKServe(api, "chat")
    kserve.start()
    # Slow smoke checks keep both candidates in the list at the same time.
    smoke = Gate(api, set() if v2_passes else {candidate_name("support", 2)}, delay_s=0.3)
    results: dict[int, Any] = {}
    barrier = threading.Barrier(2)

    def release(version: int) -> None:
        barrier.wait()
        results[version] = _release(api, desired, version, smoke)

    threads = [threading.Thread(target=release, args=(v,)) for v in (2, 3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        kserve.finish()
    assert sorted(results) == [2, 3]
    assert sorted(a for _, a in smoke.calls) == ["support-v2", "support-v3"]
    assert any({"support-v2", "support-v3"} <= set(names) for names in kserve.seen), kserve.seen
    assert results[3].status == "promoted"
    assert results[2].status == ("rolled_back" if not v2_passes else results[2].status)
    if v2_passes:
        assert results[2].status in ("promoted", "superseded")
    live = _live(api)
    assert _adapters(live) == [("support", URIS[3])]
    assert live["metadata"]["annotations"][CHAMPION_VERSION_ANNOTATION] == "3"


# --- the deploy stage: registry → LLMInferenceService → alias ----------------------------------------


class Router:
    """vLLM's OpenAI completions route behind the gateway (``/<namespace>/<name>/v1/completions``, which
    KServe's HTTPRoute rewrites to vLLM's ``/v1/completions``) on 127.0.0.1, as the live service answers: 404 for a
    ``model`` the live spec does not list, 500 for the adapters in ``failing``,
    else a completion; records every ``model`` asked for."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        self.failing: set[str] = set()
        self.asked: list[str] = []

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def completions(request: Any) -> Any:
            name = (await request.json()).get("model")
            self.asked.append(name)
            if name not in [a for a, _ in _adapters(_live(self.api_client))]:
                return JSONResponse({"error": {"message": f"model {name} not found"}}, status_code=404)
            if name in self.failing:
                return JSONResponse({"error": {"message": f"adapter {name} crashed"}}, status_code=500)
            return JSONResponse({"choices": [{"index": 0, "text": " hi", "finish_reason": "length"}]})

        return Starlette(routes=[Route(f"/{NS}/chat/v1/completions", completions, methods=["POST"])])


@pytest.fixture()
def adapter_registry(tmp_path, tiny_model_dir, tiny_adapter_dir) -> Any:
    """A sqlite MLflow registry holding base version ``support-base/1`` and adapter versions 1 and 2 of
    ``support`` on it."""
    from kubellm.config.tracking import TrackingConfig
    from kubellm.tracking import stage_run, start_parent_run
    from kubellm.tracking.registry import register_adapter

    tracking = TrackingConfig(experiment="adapters", registered_model="support", uri=f"sqlite:///{tmp_path}/mlflow.db")
    parent = start_parent_run(tracking, tmp_path, pipeline="p", run_name="r", config={})
    with stage_run(tracking, tmp_path, parent_run_id=parent, stage="register") as tr:
        for _ in range(2):
            register_adapter(tracking, tmp_path, tiny_adapter_dir, run_id=tr.run_id, base_model=tiny_model_dir)
    return tracking


def _stage_cfg(make_cfg, tmp_path, *overrides: str):
    return _cfg(
        make_cfg,
        f"workdir={tmp_path}",
        "tracking.registered_model=support",
        "tracking.experiment=adapters",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"deploy.poll_s={POLL}",
        "deploy.ready_timeout_s=10",
        "deploy.smoke_max_tokens=2",
        *overrides,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_deploy_stage_releases_adapter_versions_on_the_live_service(
    api, make_cfg, tmp_path, adapter_registry, tiny_model_dir, tiny_adapter_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    """``kubellm deploy`` and the pipeline's deploy step with ``deploy.runtime: llm-inference-service``:
    the real smoke request asks for the candidate adapter by name on the live service; only a promoted
    release moves the alias entry and the registry's ``champion``; a failing one is removed again and the
    stage fails in one line; a merged version is refused before anything is written."""
    import yaml
    from mlflow import MlflowClient

    from kubellm.cli.app import main
    from kubellm.serve.app import BackgroundServer
    from kubellm.stages import StageContext
    from kubellm.stages.deploy import deploy
    from kubellm.tracking import registry, stage_run, start_parent_run

    cfg = _stage_cfg(make_cfg, tmp_path)
    ctx = StageContext(cfg.tracking, str(tmp_path))
    uri = {v: registry.download_uri(cfg.tracking, tmp_path, v) for v in (1, 2)}
    base = registry.download_uri(cfg.tracking.model_copy(update={"registered_model": "support-base"}), tmp_path, 1)
    router = Router(api)

    def release(version: int, out: str) -> Any:
        return deploy(
            cfg, tmp_path / out, ctx, target="cluster", model_uri=f"models:/support/{version}", api_client=api
        )

    with BackgroundServer(router.app(), host="127.0.0.1") as gateway:
        kserve = FakeLLMKServe(api, "chat", url=f"{gateway.url}/{NS}/chat")
        kserve.start()
        try:
            first = release(1, "d1")  # no service, no champion yet: created with the candidate alone
            router.failing = {"support-v2"}
            with pytest.raises(ServingError) as failed:
                release(2, "d2")
            deadline = time.monotonic() + 30  # the controller reconciles the rollback's edit (bounded)
            while kserve.seen[-1:] != [["support"]] and time.monotonic() < deadline:
                time.sleep(POLL)
            after_failure = _live(api)
            router.failing = set()
            second = release(2, "d3")
            promoted_live = _live(api)
            # Another run promoted a newer version meanwhile: a candidate that passes is superseded.
            from kubernetes import client as k8s

            k8s.CustomObjectsApi(api).patch_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, "chat", {"metadata": {"annotations": {CHAMPION_VERSION_ANNOTATION: "9"}}}
            )
            with pytest.raises(
                ServingError,
                match=r"^deployment of models:/support/1 superseded: .*version 9 was "
                r"promoted meanwhile$",
            ):
                release(1, "d5")
        finally:
            kserve.finish()

    assert first.values["status"] == "promoted" and first.values["aliases"][-1:] == ["champion"]
    assert first.values["endpoint"] == f"{gateway.url}/{NS}/chat"

    message = str(failed.value)
    assert "\n" not in message and message.startswith(
        "deployment of models:/support/2 rolled_back: smoke test of adapter support-v2 failed: smoke request to "
    ), message
    assert "HTTP 500" in message and "adapter support-v2 crashed" in message
    assert _adapters(after_failure) == [("support", uri[1])]  # the candidate removed, the champion serving
    assert after_failure["metadata"]["annotations"][CHAMPION_VERSION_ANNOTATION] == "1"
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("adapters").experiment_id], "tags.`deploy.status` = 'rolled_back'"
    )
    assert run.info.status == "FAILED"

    assert second.values["status"] == "promoted", second.values["detail"]
    assert registry.champion_info(cfg.tracking, tmp_path).version == 2  # superseded moved nothing either
    assert registry.version_aliases(cfg.tracking, tmp_path, 1) == []
    assert _adapters(promoted_live) == [("support", uri[2])] and promoted_live["spec"]["model"]["uri"] == base
    assert promoted_live["metadata"]["annotations"][CHAMPION_VERSION_ANNOTATION] == "2"
    assert _adapters(_live(api)) == [("support", uri[2])]  # the superseded candidate removed itself
    # Every smoke request named the candidate, never the alias clients call: the champion was not asked.
    assert router.asked == ["support-v1", "support-v2", "support-v2", "support-v1"]

    # The manifest written: the base, the champion of the time under the alias, valid and restricted.
    manifest = tmp_path / "d3" / "llminferenceservice.yaml"
    written = yaml.safe_load(manifest.read_text())
    assert written["kind"] == "LLMInferenceService" and written["spec"]["model"]["uri"] == base
    assert _adapters(written) == [("support", uri[1])]
    assert written["metadata"]["labels"]["kubellm.io/model-version"] == "2"
    with pytest.raises(SystemExit) as check:
        main(["check", str(manifest)])
    assert check.value.code == 0, capsys.readouterr().out
    # The playground calls the alias through vLLM's routes.
    dep = k8s.AppsV1Api(api).read_namespaced_deployment("chat-playground", NS)
    args = dep.spec.template.spec.containers[0].args
    assert args[args.index("--endpoint") + 1] == f"{gateway.url}/{NS}/chat/v1"

    # A merged version: refused in one line, before a manifest is written or the cluster is touched.
    parent = start_parent_run(cfg.tracking, tmp_path, pipeline="p", run_name="merged", config={})
    with stage_run(cfg.tracking, tmp_path, parent_run_id=parent, stage="register") as tr:
        merged = registry.register_model(
            cfg.tracking, tmp_path, tiny_adapter_dir, run_id=tr.run_id, base_model=tiny_model_dir
        )
    with pytest.raises(
        ServingError, match=r"^models:/support/3 is a merged version: .*tracking.register_merged"
    ) as err:
        release(merged.version, "d4")
    assert "\n" not in str(err.value) and not (tmp_path / "d4" / "llminferenceservice.yaml").exists()
    # An adapter of a larger rank than the service's maxRank: refused up front, not after the Ready timeout.
    small = _stage_cfg(make_cfg, tmp_path, "serve.max_lora_rank=2")
    with pytest.raises(
        ServingError,
        match=r"^adapter support-v1: rank 4 is above this server's max_lora_rank 2 "
        r"\(serve.max_lora_rank\)$",
    ):
        deploy(small, tmp_path / "d6", ctx, target="cluster", model_uri="models:/support/1", api_client=api)
    assert not (tmp_path / "d6" / "llminferenceservice.yaml").exists()
    assert _adapters(_live(api)) == [("support", uri[2])]

    # `kubellm deploy --dry-run --model-version N` prints the service a release of N starts from.
    capsys.readouterr()
    sets = [
        "deploy.runtime=llm-inference-service",
        "deploy.name=chat",
        "serve.model_name=support",
        f"workdir={tmp_path}",
        "tracking.registered_model=support",
        f"tracking.uri={cfg.tracking.uri}",
    ]
    with pytest.raises(SystemExit) as done:
        main(["deploy", *[a for s in sets for a in ("--set", s)], "--model-version", "2", "--dry-run"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert done.value.code in (0, None)
    assert printed["spec"]["model"]["uri"] == base and _adapters(printed) == [("support", uri[2])]
    assert printed["metadata"]["annotations"][CHAMPION_VERSION_ANNOTATION] == "2"


@pytest.mark.integration
@pytest.mark.slow
def test_a_service_on_another_base_is_not_touched(api, make_cfg) -> None:
    desired = _existing(api, make_cfg)
    before = _live(api)
    other = {
        **desired,
        "spec": {**desired["spec"], "model": {**desired["spec"]["model"], "uri": "s3://models/base-v2"}},
    }
    with pytest.raises(
        ServingError,
        match=r"^LLMInferenceService serving/chat serves base s3://models/base-v1, not "
        r"s3://models/base-v2, the base of adapter support-v2",
    ):
        _release(api, other, 2, Gate(api))
    assert _live(api)["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


@pytest.mark.slow
def test_local_deploy_smokes_the_adapter_by_name_on_its_base(make_cfg, tmp_path, adapter_registry) -> None:
    """No cluster: the real predictor serves the base version (under the service's base name, as the
    cluster does: the alias is no model there) with the adapter version on it, and the smoke request asks
    for the adapter by its candidate name (asking for the alias would get a 404 and fail the step)."""
    from kubellm.stages import StageContext
    from kubellm.stages.deploy import deploy

    cfg = _stage_cfg(make_cfg, tmp_path, "serve.precision=fp32")
    out = deploy(
        cfg,
        tmp_path / "deploy",
        StageContext(cfg.tracking, str(tmp_path)),
        target="local",
        model_uri="models:/support/2",
    )
    v = out.values
    assert v["status"] == "verified" and v["endpoint"] == "", v["detail"]
    assert "kubellm serve --model models:/support-base/1 --adapter support-v2=models:/support/2" in v["detail"]
    assert v["aliases"][-1:] == ["champion"]
    assert (tmp_path / "deploy" / "llminferenceservice.yaml").is_file()
