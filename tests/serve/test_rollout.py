"""The InferenceService rollout against kmock's fake API server; the tests play KServe's controller."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from kubellm.k8s.inferenceservice import GROUP, PLURAL, VERSION, build_inferenceservice
from kubellm.k8s.rollout import LAST_APPLIED, RolloutResult, rollout
from kubellm.stages import StageContext
from kubellm.stages.deploy import deploy

pytestmark = pytest.mark.integration

NS = "serving"
POLL = 0.02
LATEST_URL = "http://latest-local-predictor.serving.example.com"


class FakeKServe(threading.Thread):
    """Plays KServe: every new spec becomes a revision; ``outcomes[n]`` decides what revision ``n`` does
    (``ready``, ``never`` or ``fail``). A ready revision gets Ready=True, the service URL and, with a
    canary, a ``latest`` tag URL. Like KServe's webhook it also defaults a field into the spec."""

    def __init__(self, api_client: Any, name: str, outcomes: list[str]) -> None:
        super().__init__(daemon=True)
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.name, self.outcomes = name, list(outcomes)
        self.revisions: list[str] = []
        self.seen_canary: list[int | None] = []
        self._stop_event = threading.Event()
        self.error: BaseException | None = None

    def _get(self) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, self.name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def _status(self, status: dict) -> None:
        self.api.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, self.name, {"status": status})

    def run(self) -> None:
        last_spec = None
        try:
            while not self._stop_event.is_set():
                obj = self._get()
                if obj is not None:
                    pred = dict(obj["spec"]["predictor"])
                    canary = pred.pop("canaryTrafficPercent", None)
                    pred.pop("containerConcurrency", None)
                    spec = json.dumps(pred, sort_keys=True)
                    if spec != last_spec:
                        last_spec = spec
                        self._new_revision(obj, canary)
                time.sleep(POLL)
        except BaseException as err:  # reported by finish()
            self.error = err

    def _new_revision(self, obj: dict, canary: int | None) -> None:
        n = len(self.revisions) + 1
        rev = f"{self.name}-predictor-{n:05d}"
        self.revisions.append(rev)
        self.seen_canary.append(canary)
        outcome = self.outcomes[n - 1] if n <= len(self.outcomes) else "ready"
        previous = ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}
        pending = {"latestCreatedRevision": rev, "latestReadyRevision": previous.get("latestReadyRevision")}
        self._status({"components": {"predictor": pending}})
        if "containerConcurrency" not in obj["spec"]["predictor"]:  # the webhook's default
            self.api.patch_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, self.name, {"spec": {"predictor": {"containerConcurrency": 0}}}
            )
        time.sleep(POLL * 3)
        if outcome == "ready":
            traffic = [
                {
                    "tag": "latest",
                    "revisionName": rev,
                    "latestRevision": True,
                    "percent": canary if canary is not None else 100,
                    "url": LATEST_URL,
                }
            ]
            self._status(
                {
                    "url": f"http://{self.name}.{NS}.example.com",
                    "address": {"url": f"http://{self.name}-predictor.{NS}.svc.cluster.local"},
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "components": {
                        "predictor": {"latestCreatedRevision": rev, "latestReadyRevision": rev, "traffic": traffic}
                    },
                }
            )
        elif outcome == "fail":
            self._status(
                {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "False",
                            "reason": "RevisionFailed",
                            "message": "container exited with code 1",
                        }
                    ],
                    "modelStatus": {
                        "states": {"targetModelState": "FailedToLoad"},
                        "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "no safetensors in /mnt/models"},
                    },
                }
            )

    def finish(self) -> None:
        self._stop_event.set()
        self.join(10)
        assert self.error is None, self.error


class Smoke:
    """Records the URLs it was sent and the canary share live while it ran; fails when told to."""

    def __init__(self, api_client: Any, name: str, fail: str | None = None) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.name, self.fail = name, fail
        self.urls: list[str] = []
        self.canary_during: list[Any] = []

    def __call__(self, url: str) -> None:
        self.urls.append(url)
        live = self.api.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, self.name)
        self.canary_during.append(live["spec"]["predictor"].get("canaryTrafficPercent"))
        if self.fail:
            raise RuntimeError(self.fail)


def _live(fake_api) -> dict:
    from kubernetes import client

    return client.CustomObjectsApi(fake_api.api_client()).get_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "local"
    )


def _storage_uri(obj: dict) -> str:
    env = obj["spec"]["predictor"]["containers"][0]["env"]
    return next(e["value"] for e in env if e["name"] == "STORAGE_URI")


def _patches(fake_api) -> list[dict]:
    import kmock

    return [req.data for req in fake_api.emulator[kmock.action.UPDATE]]


def _roll(fake_api, isvc: dict, smoke, timeout_s: float = 5.0) -> RolloutResult:
    return rollout(isvc, namespace=NS, api_client=fake_api.api_client(), timeout_s=timeout_s, poll_s=POLL, smoke=smoke)


@pytest.fixture()
def kserve(fake_api):
    controllers: list[FakeKServe] = []

    def start(outcomes: list[str]) -> FakeKServe:
        ctl = FakeKServe(fake_api.api_client(), "local", outcomes)
        ctl.start()
        controllers.append(ctl)
        return ctl

    yield start
    for ctl in controllers:
        ctl.finish()


def test_first_rollout_creates_and_promotes_then_same_request_changes_nothing(fake_api, kserve, make_cfg) -> None:
    isvc = build_inferenceservice(make_cfg(), "s3://models/kubellm/1", model_version="1")
    ctl = kserve(["ready"])
    smoke = Smoke(fake_api.api_client(), "local")
    result = _roll(fake_api, isvc, smoke)
    assert (result.status, result.revision, result.changed) == ("promoted", "local-predictor-00001", True)
    assert result.url == "http://local.serving.example.com"
    assert result.address == "http://local-predictor.serving.svc.cluster.local"
    live = _live(fake_api)
    # A first revision has nothing to split traffic with: created without the canary share.
    assert ctl.seen_canary == [None] and "canaryTrafficPercent" not in live["spec"]["predictor"]
    assert json.loads(live["metadata"]["annotations"][LAST_APPLIED])["predictor"]["minReplicas"] == 1

    patches_before = len(_patches(fake_api))
    again = _roll(fake_api, isvc, smoke)
    assert (again.status, again.changed) == ("promoted", False)
    # Nothing patched by the rollout, though the webhook's default (containerConcurrency) differs.
    assert len(_patches(fake_api)) == patches_before
    assert len(ctl.revisions) == 1 and len(smoke.urls) == 2


def test_update_goes_through_a_smoke_tested_canary(fake_api, kserve, make_cfg) -> None:
    cfg = make_cfg()
    ctl = kserve(["ready", "ready"])
    smoke = Smoke(fake_api.api_client(), "local")
    assert _roll(fake_api, build_inferenceservice(cfg, "s3://models/kubellm/1"), smoke).status == "promoted"

    result = _roll(fake_api, build_inferenceservice(cfg, "s3://models/kubellm/2", model_version="2"), smoke)
    assert (result.status, result.revision) == ("promoted", "local-predictor-00002")
    assert ctl.seen_canary == [None, 10]
    assert smoke.canary_during[-1] == 10 and smoke.urls[-1] == LATEST_URL  # the canary's own URL
    live = _live(fake_api)
    assert "canaryTrafficPercent" not in live["spec"]["predictor"]  # promoted: 100 % to the new spec
    assert _storage_uri(live) == "s3://models/kubellm/2"
    assert live["metadata"]["labels"]["kubellm.io/model-version"] == "2"


def test_failed_smoke_rolls_back_to_the_previous_spec(fake_api, kserve, make_cfg) -> None:
    cfg = make_cfg()
    kserve(["ready", "ready"])
    first = build_inferenceservice(cfg, "s3://models/kubellm/1", model_version="1")
    assert _roll(fake_api, first, Smoke(fake_api.api_client(), "local")).status == "promoted"
    before = _live(fake_api)

    bad = build_inferenceservice(
        make_cfg("deploy.max_replicas=3", "platform.default.node_selector={}"),
        "s3://models/kubellm/2",
        model_version="2",
    )
    result = _roll(fake_api, bad, Smoke(fake_api.api_client(), "local", fail="HTTP 500 from the canary"))
    assert result.status == "rolled_back"
    assert result.reason == "smoke test failed: HTTP 500 from the canary"
    live = _live(fake_api)
    assert _storage_uri(live) == "s3://models/kubellm/1"
    assert live["spec"]["predictor"]["maxReplicas"] == 1
    assert live["spec"]["predictor"]["nodeSelector"] == {"pool": "cpu"}  # removed by the update, restored
    assert "canaryTrafficPercent" not in live["spec"]["predictor"]
    assert live["metadata"]["labels"]["kubellm.io/model-version"] == "1"
    assert live["metadata"]["annotations"][LAST_APPLIED] == before["metadata"]["annotations"][LAST_APPLIED]
    # Traffic left the canary first, before the spec was restored.
    canary_patches = [
        p["spec"]["predictor"].get("canaryTrafficPercent")
        for p in _patches(fake_api)
        if "predictor" in p.get("spec", {}) and "canaryTrafficPercent" in p["spec"]["predictor"]
    ]
    assert canary_patches[-2:] == [0, None]


def test_update_never_ready_times_out_and_rolls_back(fake_api, kserve, make_cfg) -> None:
    cfg = make_cfg("deploy.canary_traffic_percent=null")
    kserve(["ready", "never"])
    smoke = Smoke(fake_api.api_client(), "local")
    assert _roll(fake_api, build_inferenceservice(cfg, "s3://models/kubellm/1"), smoke).status == "promoted"
    t0 = time.monotonic()
    result = _roll(fake_api, build_inferenceservice(cfg, "s3://models/kubellm/2"), smoke, timeout_s=0.5)
    assert 0.5 <= time.monotonic() - t0 < 10  # it waited its 0.5 s, then gave up (not minutes later)
    assert result.status == "rolled_back" and result.reason.startswith("not Ready within 0.5 s")
    assert len(smoke.urls) == 1  # the stale Ready=True of revision 1 was not taken for revision 2
    assert _storage_uri(_live(fake_api)) == "s3://models/kubellm/1"


def test_first_deployment_that_fails_to_load_is_failed_fast(fake_api, kserve, make_cfg) -> None:
    kserve(["fail"])
    t0 = time.monotonic()
    result = _roll(
        fake_api,
        build_inferenceservice(make_cfg(), "s3://models/broken"),
        Smoke(fake_api.api_client(), "local"),
        timeout_s=30,
    )
    assert time.monotonic() - t0 < 15  # failed on the first failure it saw, not at the 30 s timeout
    assert result.status == "failed"
    assert "RevisionFailed" in result.reason and "container exited with code 1" in result.reason
    assert _live(fake_api)["metadata"]["name"] == "local"  # left in place for `kubectl describe`


def _deploy(cfg, version: int, tmp_path, **kw):
    """``kubellm deploy``'s path: the deploy stage against the fake cluster, tracked in a sqlite store (the
    registry calls are recorded by the test)."""
    cfg = cfg.model_copy(
        update={"tracking": cfg.tracking.model_copy(update={"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db"})}
    )
    return deploy(
        cfg,
        tmp_path / "deploy",
        StageContext(cfg.tracking, str(tmp_path)),
        target="cluster",
        model_uri=f"models:/{cfg.tracking.registered_model}/{version}",
        **kw,
    )


def test_deploy_promotes_the_version_and_creates_the_playground(
    fake_api, kserve, make_cfg, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes import client

    from kubellm.k8s.playground import apply_playground, build_playground
    from kubellm.tracking import registry

    promoted = []
    monkeypatch.setattr(
        registry,
        "promote",
        lambda cfg, workdir, version, alias: (
            promoted.append((version, alias))
            or registry.ModelVersionInfo(name="m", version=version, aliases=[alias], uri="", tags={})
        ),
    )
    cfg = make_cfg("deploy.poll_s=0.02", "deploy.ready_timeout_s=5", "deploy.storage_uri=s3://models/kubellm/3")
    kserve(["ready"])
    out = _deploy(cfg, 3, tmp_path, api_client=fake_api.api_client(), smoke=Smoke(fake_api.api_client(), "local"))
    assert out.values["status"] == "promoted" and promoted == [(3, "champion")]
    assert out.values["aliases"] == ["champion"]
    dep = client.AppsV1Api(fake_api.api_client()).read_namespaced_deployment("local-playground", NS)
    args = dep.spec.template.spec.containers[0].args
    assert args[args.index("--endpoint") + 1] == "http://local-predictor.serving.svc.cluster.local"
    objs = build_playground(cfg, "http://local-predictor.serving.svc.cluster.local")
    assert apply_playground(objs, namespace=NS, api_client=fake_api.api_client()) == ["unchanged", "unchanged"]
    objs[0]["spec"]["replicas"] = 2
    assert apply_playground(objs, namespace=NS, api_client=fake_api.api_client()) == ["patched", "unchanged"]


def test_a_failed_deploy_promotes_nothing(
    fake_api, kserve, make_cfg, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from kubellm.errors import ServingError
    from kubellm.tracking import registry

    promoted = []
    monkeypatch.setattr(registry, "promote", lambda *a, **kw: promoted.append(a))
    kserve(["fail"])
    cfg = make_cfg("deploy.poll_s=0.02", "deploy.storage_uri=s3://models/broken")
    with pytest.raises(ServingError, match="failed"):
        _deploy(cfg, 4, tmp_path, api_client=fake_api.api_client(), smoke=Smoke(fake_api.api_client(), "local"))
    assert promoted == []
    with pytest.raises(ApiException) as err:
        client.AppsV1Api(fake_api.api_client()).read_namespaced_deployment("local-playground", NS)
    assert err.value.status == 404
