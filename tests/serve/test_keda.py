"""Serving on a cluster beyond the kubellm runtime's own scaling (issue 22): the optional KEDA ScaledObject
(queue depth from vLLM's metric name, validated against the vendored KEDA CRD, KServe told to leave
autoscaling to it), and LoRA adapters on KServe's Hugging Face runtime through vLLM's own flags."""

from __future__ import annotations

import pytest

from kubellm.errors import ServingError
from kubellm.k8s.inferenceservice import build_inferenceservice
from kubellm.k8s.keda import build_scaled_object
from kubellm.k8s.schema import validate_against_crd

PROMETHEUS = "http://prometheus.monitoring:9090"


def test_scaled_object_scales_the_predictor_on_its_queue(make_cfg) -> None:
    cfg = make_cfg(
        "deploy.name=chat",
        "serve.model_name=support",
        "deploy.deployment_mode=RawDeployment",
        f"deploy.keda_prometheus_url={PROMETHEUS}",
        "deploy.min_replicas=1",
        "deploy.max_replicas=4",
        "serve.max_batch_size=6",
    )
    obj = build_scaled_object(cfg)
    assert validate_against_crd(obj) == []
    spec = obj["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-predictor"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
    trigger = spec["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "6"
    assert trigger["metadata"]["query"] == 'sum(vllm:num_requests_waiting{namespace="serving",model_name="support"})'
    isvc = build_inferenceservice(cfg, "s3://m/x")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    broken = {**obj, "spec": {**spec, "triggers": [{"metadata": {}}]}}  # no type: KEDA's API refuses it
    assert any("spec.triggers[0]" in e for e in validate_against_crd(broken))


def test_scaled_object_needs_the_raw_deployment_of_the_kubellm_runtime(make_cfg) -> None:
    with pytest.raises(ServingError, match="deploy.keda_prometheus_url: no Prometheus"):
        build_scaled_object(make_cfg())
    with pytest.raises(ServingError, match="needs deploy.runtime kubellm and deploy.deployment_mode RawDeployment"):
        build_scaled_object(make_cfg(f"deploy.keda_prometheus_url={PROMETHEUS}"))
    assert (
        "serving.kserve.io/autoscalerClass"
        not in build_inferenceservice(make_cfg(), "s3://m/x")["metadata"]["annotations"]
    )


def test_adapters_on_the_huggingface_runtime_use_vllms_lora_flags(make_cfg) -> None:
    gpu = (
        "deploy.runtime=huggingface",
        "platform.default.resources.gpus=1",
        "serve.adapters={support: /models/adapters/support, legal: org/legal-lora}",
    )
    isvc = build_inferenceservice(make_cfg(*gpu), "s3://m/base")
    assert validate_against_crd(isvc) == []
    args = isvc["spec"]["predictor"]["model"]["args"]
    assert args[args.index("--enable-lora") :] == [
        "--enable-lora",
        "--max-lora-rank=64",
        "--max-loras=16",
        "--lora-modules",
        "support=/models/adapters/support",
        "legal=org/legal-lora",
    ]
    with pytest.raises(ServingError, match="need its vLLM backend"):
        build_inferenceservice(make_cfg(*gpu[::2]), "s3://m/base")
    with pytest.raises(ServingError, match=r"^serve.adapters.support: models:/support@champion cannot be loaded"):
        build_inferenceservice(make_cfg(*gpu[:2], "serve.adapters={support: 'models:/support@champion'}"), "s3://m/b")
