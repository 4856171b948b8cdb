"""InferenceService and playground manifests: valid against KServe's CRD / Kubernetes' schemas, restricted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from kubellm.config import load_config
from kubellm.errors import ServingError
from kubellm.k8s import podsecurity
from kubellm.k8s.inferenceservice import MODEL_DIR, build_inferenceservice
from kubellm.k8s.playground import build_playground
from kubellm.k8s.schema import validate_against_crd, vendored_crd

VARIANTS = {
    "kubellm-cpu": [],
    "kubellm-gpu-raw": [
        "platform.stages={deploy: {resources: {gpus: 2, accelerator: nvidia-l4}}}",
        "deploy.deployment_mode=RawDeployment",
        "deploy.canary_traffic_percent=null",
    ],
    "kubellm-adapter": [
        "serve.base_model=/models/base",
        "deploy.scale_metric=rps",
        "deploy.min_replicas=0",
        "deploy.max_replicas=4",
    ],
    "hf-cpu": ["deploy.runtime=huggingface", "deploy.hf_args=[--dtype=float32]"],
    "hf-gpu": [
        "deploy.runtime=huggingface",
        "platform.stages={deploy: {resources: {gpus: 1}}}",
        "deploy.deployment_mode=Serverless",
        "deploy.scale_target=3",
    ],
    "kubellm-external": ["deploy.visibility=external"],
}


@pytest.fixture(scope="module")
def isvc_crd() -> Path:
    return vendored_crd("serving.kserve.io", "InferenceService")


def _isvc(make_cfg, variant: str, **kw) -> dict:
    return build_inferenceservice(make_cfg(*VARIANTS[variant]), "s3://models/kubellm/3", **kw)


def _predictor_container(isvc: dict) -> dict:
    pred = isvc["spec"]["predictor"]
    return pred["model"] if "model" in pred else pred["containers"][0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_is_valid_against_kserve_crd(variant: str, isvc_crd: Path, make_cfg) -> None:
    isvc = _isvc(make_cfg, variant, model_version="7")
    assert validate_against_crd(isvc, isvc_crd) == []
    # The YAML that `kubellm deploy --dry-run` prints parses back to the same object.
    assert yaml.safe_load(yaml.safe_dump(isvc)) == isvc


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_runs_restricted(variant: str, make_cfg) -> None:
    isvc = _isvc(make_cfg, variant)
    assert podsecurity.check(isvc) == []
    pred = isvc["spec"]["predictor"]
    assert pred["serviceAccountName"] == "kubellm-pipeline"
    assert pred["automountServiceAccountToken"] is False
    sc = _predictor_container(isvc)["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_kubellm_runtime_serves_storage_uri_with_every_serve_field_pinned(make_cfg) -> None:
    cfg = make_cfg("serve.max_batch_size=4", "serve.model_name=chat", "serve.precision=fp32")
    isvc = build_inferenceservice(cfg, "s3://models/kubellm/3")
    c = isvc["spec"]["predictor"]["containers"][0]
    assert c["name"] == "kserve-container" and c["image"] == cfg.platform.serving_image
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["STORAGE_URI"] == "s3://models/kubellm/3" and env["HF_HUB_OFFLINE"] == "1"
    assert c["command"] == ["kubellm"] and c["args"][:5] == ["serve", "--model", MODEL_DIR, "--port", "8080"]
    # The --set arguments, read back by the CLI's own config loader, give the run's serve section.
    sets = [c["args"][i + 1] for i, a in enumerate(c["args"]) if a == "--set"]
    pod_serve = load_config(None, sets).serve
    assert pod_serve.host == "0.0.0.0"
    assert pod_serve.model_dump(exclude={"host", "port", "model"}) == cfg.serve.model_dump(
        exclude={"host", "port", "model"}
    )
    assert isvc["metadata"]["annotations"]["kubellm.io/model-name"] == "chat"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/models/chat/ready"


def test_placement_resources_and_autoscaling(make_cfg) -> None:
    isvc = _isvc(make_cfg, "kubellm-gpu-raw")
    pred = isvc["spec"]["predictor"]
    c = pred["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pred["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert "canaryTrafficPercent" not in pred
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    # concurrency target defaults to the batch size: a pod's batch is full at that many requests.
    assert (pred["scaleMetric"], pred["scaleTarget"]) == ("concurrency", 8)

    cpu = _isvc(make_cfg, "kubellm-cpu")["spec"]["predictor"]
    assert cpu["tolerations"][0]["key"] == "dedicated" and cpu["nodeSelector"] == {"pool": "cpu"}
    assert cpu["imagePullSecrets"] == [{"name": "regcred"}]
    assert cpu["canaryTrafficPercent"] == 10
    mounts = {m["mountPath"] for m in cpu["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/models", "/var/run/secrets/hub"} <= mounts

    rps = _isvc(make_cfg, "kubellm-adapter")["spec"]["predictor"]
    assert (rps["minReplicas"], rps["maxReplicas"], rps["scaleMetric"]) == (0, 4, "rps")
    args = rps["containers"][0]["args"]
    assert args[args.index("--base") + 1] == "/models/base"


def test_startup_probe_window_follows_config(make_cfg) -> None:
    cfg = make_cfg("deploy.startup_timeout_s=605")
    c = build_inferenceservice(cfg, "pvc://models/m")["spec"]["predictor"]["containers"][0]
    probe = c["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 605
    assert probe["failureThreshold"] == math.ceil(605 / probe["periodSeconds"])


def test_huggingface_runtime(make_cfg) -> None:
    cpu = _isvc(make_cfg, "hf-cpu")["spec"]["predictor"]
    assert "containers" not in cpu
    model = cpu["model"]
    assert model["modelFormat"] == {"name": "huggingface"} and model["storageUri"] == "s3://models/kubellm/3"
    assert "--backend=huggingface" in model["args"] and model["args"][-1] == "--dtype=float32"
    assert "--model_name=kubellm-local" in model["args"]  # named after tracking.registered_model
    gpu = _isvc(make_cfg, "hf-gpu")["spec"]["predictor"]["model"]
    assert not any(a.startswith("--backend") for a in gpu["args"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_missing_storage_uri_is_one_clear_line(make_cfg) -> None:
    with pytest.raises(ServingError, match="deploy.storage_uri"):
        build_inferenceservice(make_cfg(), None)
    env = build_inferenceservice(make_cfg("deploy.storage_uri=gs://b/m"))["spec"]["predictor"]["containers"][0]["env"]
    assert {"name": "STORAGE_URI", "value": "gs://b/m"} in env


def test_playground_deployment_and_service(make_cfg) -> None:
    import kubernetes_validate

    cfg = make_cfg("playground.temperature=0.2", "serve.model_name=chat")
    objs = build_playground(
        cfg,
        "http://local-predictor.serving.svc.cluster.local",
        compare_url="http://base-predictor.serving.svc.cluster.local",
    )
    assert [o["kind"] for o in objs] == ["Deployment", "Service"]
    for obj in objs:
        kubernetes_validate.validate(obj, "1.30.0", strict=True)  # raises on any schema error
        assert podsecurity.check(obj) == []
    dep, svc = objs
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubellm-pipeline" and pod["automountServiceAccountToken"] is False
    c = pod["containers"][0]
    args = c["args"]
    assert args[args.index("--endpoint") + 1] == "http://local-predictor.serving.svc.cluster.local"
    assert args[args.index("--compare-endpoint") + 1] == "http://base-predictor.serving.svc.cluster.local"
    pinned = load_config(None, [args[i + 1] for i, a in enumerate(args) if a == "--set"]).playground
    assert (pinned.host, pinned.model, pinned.temperature) == ("0.0.0.0", "chat", 0.2)
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert dep["metadata"]["namespace"] == "serving"


@pytest.mark.parametrize("runtime", ["kubellm", "huggingface"])
def test_the_predictor_gets_a_hub_token_only_when_it_loads_from_the_hub(make_cfg, runtime: str) -> None:
    token = (
        "platform.stages={deploy: {secret_env: [{secret: hf-token, key: token, env: HF_TOKEN}, "
        "{secret: s3-creds, key: key, env: AWS_ACCESS_KEY_ID}]}}"
    )

    def env_names(*overrides: str) -> set[str]:
        isvc = build_inferenceservice(make_cfg(token, f"deploy.runtime={runtime}", *overrides), "s3://m/1")
        return {e["name"] for e in _predictor_container(isvc)["env"]}

    local = env_names()
    assert "HF_TOKEN" not in local and {"AWS_ACCESS_KEY_ID", "HF_HUB_OFFLINE"} <= local
    if runtime == "kubellm":  # an adapter on a Hub base model downloads it: then the token is needed
        hub = env_names("serve.base_model=meta-llama/Llama-3.2-1B")
        assert "HF_TOKEN" in hub and "HF_HUB_OFFLINE" not in hub


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"kubellm-external"}))
def test_cluster_local_and_scraped_unless_told_otherwise(make_cfg, variant: str) -> None:
    isvc = _isvc(make_cfg, variant)
    meta = isvc["metadata"]
    assert meta["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    assert "networking.kserve.io/visibility" not in isvc["spec"]["predictor"]["labels"]
    assert {
        k: meta["annotations"][k]
        for k in (
            "serving.kserve.io/enable-prometheus-scraping",
            "prometheus.kserve.io/port",
            "prometheus.kserve.io/path",
        )
    } == {
        "serving.kserve.io/enable-prometheus-scraping": "true",
        "prometheus.kserve.io/port": "8080",
        "prometheus.kserve.io/path": "/metrics",
    }
    external = build_inferenceservice(make_cfg(*VARIANTS[variant], "deploy.visibility=external"), "s3://m/1")
    assert "networking.kserve.io/visibility" not in external["metadata"]["labels"]
