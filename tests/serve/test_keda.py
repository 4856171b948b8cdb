"""The optional KEDA ScaledObject of the kubellm runtime (issue 22): queue depth from vLLM's metric name,
validated against the vendored KEDA CRD, and KServe told to leave autoscaling to it."""

from __future__ import annotations

import pytest

from kubellm.errors import ServingError
from kubellm.k8s.inferenceservice import build_inferenceservice
from kubellm.k8s.keda import build_scaled_object
from kubellm.k8s.schema import validate_against_crd

PROMETHEUS = "http://prometheus.monitoring:9090"


def test_scaled_object_scales_the_predictor_on_its_queue(make_cfg) -> None:
    cfg = make_cfg("deploy.name=chat", "serve.model_name=support", "deploy.deployment_mode=RawDeployment",
                   f"deploy.keda_prometheus_url={PROMETHEUS}", "deploy.min_replicas=1", "deploy.max_replicas=4",
                   "serve.max_batch_size=6")
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
    assert "serving.kserve.io/autoscalerClass" not in build_inferenceservice(make_cfg(), "s3://m/x")["metadata"][
        "annotations"]
