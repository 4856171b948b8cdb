"""A KEDA ``ScaledObject`` (``keda.sh/v1alpha1``, KEDA 2.20) scaling the kubellm predictor on its queue.

Requests waiting for a batch are what a predictor cannot absorb; CPU or concurrency lag behind it. The
predictor exports vLLM's ``vllm:num_requests_waiting`` (:mod:`kubellm.serve.metrics`), so the same
Prometheus trigger KEDA users write for vLLM scales it: ``sum(vllm:num_requests_waiting{...})`` over the
served model's pods, one replica per ``deploy.scale_target`` waiting requests (``serve.max_batch_size``
by default: a full batch waiting), between ``deploy.min_replicas`` and ``deploy.max_replicas``.

It targets the Deployment KServe creates for a ``RawDeployment`` InferenceService (``<name>-predictor``);
the InferenceService then carries ``serving.kserve.io/autoscalerClass: external`` so KServe creates no
HPA of its own (:func:`kubellm.k8s.inferenceservice.build_inferenceservice`). Validated against the
vendored KEDA CRD like every generated custom resource.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubellm.errors import ServingError
from kubellm.k8s.inferenceservice import isvc_name

if TYPE_CHECKING:
    from kubellm.config.run import RunConfig

API_VERSION = "keda.sh/v1alpha1"
KIND = "ScaledObject"
#: The InferenceService annotation handing autoscaling to something else (KEDA here).
AUTOSCALER_ANNOTATION = "serving.kserve.io/autoscalerClass"


def build_scaled_object(run_cfg: RunConfig) -> dict[str, Any]:
    """The ScaledObject for ``run_cfg``'s predictor (``deploy.keda_prometheus_url`` must be set)."""
    deploy, serve = run_cfg.deploy, run_cfg.serve
    if not deploy.keda_prometheus_url:
        raise ServingError("deploy.keda_prometheus_url: no Prometheus to read the queue depth from")
    if deploy.runtime != "kubellm" or deploy.deployment_mode != "RawDeployment":
        raise ServingError(
            "deploy.keda_prometheus_url: KEDA scales the kubellm runtime's predictor Deployment, "
            "which needs deploy.runtime kubellm and deploy.deployment_mode RawDeployment"
        )
    name = isvc_name(run_cfg)
    namespace = run_cfg.platform.namespace
    threshold = deploy.scale_target or serve.max_batch_size
    query = f'sum(vllm:num_requests_waiting{{namespace="{namespace}",model_name="{serve.model_name}"}})'
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": f"{name}-predictor",
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "kubellm",
                "app.kubernetes.io/instance": name,
                "kubellm.io/run": run_cfg.name,
            },
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{name}-predictor"},
            "minReplicaCount": deploy.min_replicas,
            "maxReplicaCount": deploy.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": [
                {
                    "type": "prometheus",
                    "name": "queue-depth",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": deploy.keda_prometheus_url,
                        "query": query,
                        "threshold": str(threshold),
                    },
                }
            ],
        },
    }
