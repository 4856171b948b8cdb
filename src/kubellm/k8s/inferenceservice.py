"""The KServe InferenceService of a run: pure functions from the run config to a manifest dict.

Two predictors:

- ``runtime: kubellm`` — our image (``platform.serving_image``) running ``kubellm serve`` on
  0.0.0.0:8080 as KServe's custom container ``kserve-container``. Its ``STORAGE_URI`` env var is how a
  custom container asks KServe for the storage initializer: the model (merged, or a LoRA adapter whose
  base is ``serve.base_model``) is downloaded into ``/mnt/models`` before the container starts.
- ``runtime: huggingface`` — KServe's own Hugging Face runtime (``modelFormat: huggingface``) with a
  ``storageUri``, for a merged model. Without a GPU it is told ``--backend=huggingface``: its default
  vLLM backend needs one.

Both get the ``deploy`` stage's placement (resources, GPUs, node selector, tolerations, secrets; a Hub
token only when the predictor loads a base model from the Hub, see :func:`_predictor_placement`), the
restricted security context of :mod:`kubellm.k8s.pods`, the pipeline's service account, autoscaling
bounds, and probes sized for slow model loads: the startup probe allows ``deploy.startup_timeout_s``
(20 min by default: a 7 B model is ~15 GB to download and load) before the pod is restarted, after which
readiness and liveness take over with short periods.

Private and observable by default: the ``networking.kserve.io/visibility: cluster-local`` label keeps the
service off the ingress gateway (the predictor has no authentication) unless ``deploy.visibility:
external``; KServe's ``serving.kserve.io/enable-prometheus-scraping`` annotation with
``prometheus.kserve.io/port|path`` points Prometheus at the predictor's ``/metrics`` (our runtime's
:mod:`kubellm.serve.metrics`; KServe's Hugging Face runtime serves its own there too).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from kubellm.errors import ServingError
from kubellm.k8s import pods, security

if TYPE_CHECKING:
    from kubellm.config.platform import Placement
    from kubellm.config.run import RunConfig

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PLURAL = "inferenceservices"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceService"

#: KServe injects the storage initializer and routes traffic to the container of this name.
CONTAINER = "kserve-container"
#: Where the storage initializer puts the model.
MODEL_DIR = "/mnt/models"
#: The port KServe (and Knative) send requests to.
HTTP_PORT = 8080
#: Annotation selecting Serverless (Knative) or RawDeployment mode.
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
#: Annotation giving the newest revision its own URL during a canary.
TAG_ROUTING_ANNOTATION = "serving.kserve.io/enable-tag-routing"
#: Annotation naming the model as clients address it (OpenAI ``model``, ``/v1/models/<name>``).
MODEL_NAME_ANNOTATION = "kubellm.io/model-name"
#: Label recording which registered model version a revision serves.
MODEL_VERSION_LABEL = "kubellm.io/model-version"
#: Label keeping an InferenceService inside the cluster (no ingress route).
VISIBILITY_LABEL = "networking.kserve.io/visibility"
#: Annotations asking KServe to expose the predictor's Prometheus endpoint for scraping.
SCRAPE_ANNOTATIONS = {
    "serving.kserve.io/enable-prometheus-scraping": "true",
    "prometheus.kserve.io/port": str(HTTP_PORT),
    "prometheus.kserve.io/path": "/metrics",
}
#: Environment variables that carry a Hugging Face Hub token (huggingface_hub reads each of them).
HUB_TOKEN_ENV = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN"})

# Startup probe period: 10 s keeps the probe cheap while a large model loads; the threshold is derived
# from deploy.startup_timeout_s so the window is what the config says.
_STARTUP_PERIOD_S = 10


def isvc_name(run_cfg: RunConfig) -> str:
    """The InferenceService name: ``deploy.name``, else the run name."""
    return run_cfg.deploy.name or run_cfg.name


def build_inferenceservice(
    run_cfg: RunConfig, storage_uri: str | None = None, *, model_version: str | int | None = None
) -> dict[str, Any]:
    """The InferenceService manifest for ``run_cfg`` serving the model at ``storage_uri``.

    ``storage_uri`` falls back to ``deploy.storage_uri``; one of them is required. ``model_version`` (the
    registry version being deployed) is recorded as a label so a rollback can be traced to a version.
    ``canaryTrafficPercent`` is set from ``deploy.canary_traffic_percent``;
    :func:`kubellm.k8s.rollout.rollout` drops it when it creates the service for the first time.
    """
    deploy = run_cfg.deploy
    if deploy.runtime == "llm-inference-service":
        raise ServingError(
            "deploy.runtime llm-inference-service deploys an LLMInferenceService, not an "
            "InferenceService: build it with kubellm.k8s.llmisvc.build_llm_inference_service"
        )
    uri = storage_uri or deploy.storage_uri
    if not uri:
        raise ServingError(
            "deploy.storage_uri: no model location to deploy (set it in the config or pass --storage-uri s3://…/model)"
        )
    name = isvc_name(run_cfg)
    placement = _predictor_placement(run_cfg)
    served = run_cfg.serve.model_name  # one name on both runtimes: clients and the smoke test use it
    probes = _probes(served, deploy.startup_timeout_s)

    if deploy.runtime == "kubellm":
        container = pods.container(
            CONTAINER,
            run_cfg.platform.serving_image,
            placement,
            command=["kubellm"],
            args=_kubellm_args(run_cfg),
            env={"STORAGE_URI": uri, **_offline_env(run_cfg)},
            ports=[{"containerPort": HTTP_PORT, "protocol": "TCP"}],
        )
        container.update(probes)
        predictor: dict[str, Any] = pods.pod_spec([container], placement, run_cfg.platform)
    else:
        predictor = pods.pod_spec([], placement, run_cfg.platform)
        del predictor["containers"]
        predictor["model"] = _hf_model(run_cfg, placement, uri, served, probes)

    labels = workload_labels(run_cfg, name, "predictor", model_version, placement, predictor)
    predictor["minReplicas"] = deploy.min_replicas
    predictor["maxReplicas"] = deploy.max_replicas
    predictor["scaleMetric"] = deploy.scale_metric
    predictor["scaleTarget"] = deploy.scale_target or (
        run_cfg.serve.max_batch_size if deploy.scale_metric == "concurrency" else _DEFAULT_TARGETS[deploy.scale_metric]
    )
    predictor["timeout"] = deploy.request_timeout_s
    if deploy.canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = deploy.canary_traffic_percent

    annotations = {MODEL_NAME_ANNOTATION: served, **SCRAPE_ANNOTATIONS}
    if deploy.deployment_mode:
        annotations[MODE_ANNOTATION] = deploy.deployment_mode
    if deploy.keda_prometheus_url and deploy.runtime == "kubellm":
        annotations["serving.kserve.io/autoscalerClass"] = "external"  # KEDA scales it (kubellm.k8s.keda)
    if deploy.canary_traffic_percent is not None:
        # Tag routing gives the newest revision its own URL (status…traffic[tag=latest].url), so the
        # rollout's smoke request reaches the canary itself rather than a 10 % chance of it.
        annotations[TAG_ROUTING_ANNOTATION] = "true"
    if deploy.visibility == "cluster-local":  # on the InferenceService only: KServe reads it there
        labels = {**labels, VISIBILITY_LABEL: "cluster-local"}
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": run_cfg.platform.namespace,
        "labels": labels,
        "annotations": annotations,
    }
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": {"predictor": predictor}}


def workload_labels(
    run_cfg: RunConfig,
    name: str,
    component: str,
    model_version: str | int | None,
    placement: Placement,
    target: dict[str, Any],
) -> dict[str, str]:
    """The serving resource's labels; they and the placement's pod labels and annotations are also set
    on ``target`` (the component or pod template KServe copies them from)."""
    labels = {
        "app.kubernetes.io/name": "kubellm",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/instance": name,
        "kubellm.io/run": run_cfg.name,
    }
    if model_version is not None:
        labels[MODEL_VERSION_LABEL] = str(model_version)
    pod_meta = pods.pod_metadata(placement, labels)
    target["labels"] = pod_meta["labels"]
    if "annotations" in pod_meta:
        target["annotations"] = pod_meta["annotations"]
    return labels


# Per-pod targets when the metric is not concurrency: 10 requests/s, 80 % CPU or memory utilisation.
_DEFAULT_TARGETS = {"rps": 10, "cpu": 80, "memory": 80}


def _kubellm_args(run_cfg: RunConfig) -> list[str]:
    """``kubellm serve`` arguments: every serve field pinned with ``--set`` so whatever config file the
    image might hold, the pod serves exactly what this run config says."""
    serve = run_cfg.serve
    args = ["serve", "--model", MODEL_DIR, "--port", str(HTTP_PORT)]
    if serve.base_model:
        args += ["--base", serve.base_model]
    # 0.0.0.0 inside the pod: the kubelet's probes and KServe's router come from outside.
    return args + set_args("serve", {**serve.model_dump(exclude={"model", "base_model", "port"}), "host": "0.0.0.0"})


def set_args(section: str, values: dict[str, Any]) -> list[str]:
    """``--set section.key=value`` for each value that is not ``None`` (JSON scalars are YAML scalars,
    so a string stays a string: ``"123"`` is not read back as an int)."""
    args: list[str] = []
    for key, value in values.items():
        if value is not None:
            args += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return args


def _needs_hub(run_cfg: RunConfig) -> bool:
    """The predictor downloads from the Hub only for a LoRA adapter whose base is a Hub id; the model
    itself comes from ``/mnt/models``, fetched by KServe's storage initializer with its own credentials."""
    base = run_cfg.serve.base_model
    return base is not None and not base.startswith("/")


def _offline_env(run_cfg: RunConfig) -> dict[str, str]:
    """Keep the predictor off the Hub when everything it loads is local (the usual case)."""
    return {} if _needs_hub(run_cfg) else {"HF_HUB_OFFLINE": "1"}


def _predictor_placement(run_cfg: RunConfig) -> Placement:
    """The deploy placement, less any Hub token when the predictor never talks to the Hub: a serving pod
    reachable by every client should not hold a credential it does not use."""
    placement = run_cfg.platform.placement("deploy")
    if _needs_hub(run_cfg):
        return placement
    kept = [s for s in placement.secret_env if s.env not in HUB_TOKEN_ENV]
    return placement.model_copy(update={"secret_env": kept})


def _hf_model(run_cfg: RunConfig, placement: Placement, uri: str, name: str, probes: dict[str, Any]) -> dict[str, Any]:
    args = [f"--model_name={name}", f"--model_dir={MODEL_DIR}", f"--http_port={HTTP_PORT}"]
    if not placement.resources.gpus and not any(a.startswith("--backend") for a in run_cfg.deploy.hf_args):
        args.append("--backend=huggingface")
    args += _lora_args(run_cfg, args)
    args += run_cfg.deploy.hf_args
    model: dict[str, Any] = {
        "modelFormat": {"name": "huggingface"},
        "storageUri": uri,
        "args": args,
        "env": pods.env_list(placement, _offline_env(run_cfg)),
        "volumeMounts": pods.volume_mounts(placement),
        "securityContext": security.container_security_context(),
        **probes,
    }
    res = pods.resources(placement.resources)
    if res:
        model["resources"] = res
    return model


def _lora_args(run_cfg: RunConfig, args: list[str]) -> list[str]:
    """``serve.adapters`` on KServe's Hugging Face runtime: its vLLM backend's own LoRA flags
    (``--enable-lora --lora-modules name=path …``), each adapter served by name on the merged-free base.
    vLLM loads them itself, so each must be a path inside the pod (a PVC of the deploy placement) or a
    Hub id; the registry's ``models:/`` URIs only resolve in ``kubellm serve``."""
    serve = run_cfg.serve
    if not serve.adapters:
        return []
    if "--backend=huggingface" in args + run_cfg.deploy.hf_args:
        raise ServingError(
            "serve.adapters on deploy.runtime huggingface need its vLLM backend (a GPU in the deploy "
            "placement); the huggingface backend serves no LoRA adapters"
        )
    for name, uri in serve.adapters.items():
        if "://" in uri or uri.startswith("models:/"):
            raise ServingError(
                f"serve.adapters.{name}: {uri} cannot be loaded by vLLM in the pod; give a path on "
                "a PVC of the deploy placement or a Hub id (or use deploy.runtime kubellm)"
            )
    return [
        "--enable-lora",
        f"--max-lora-rank={serve.max_lora_rank}",
        f"--max-loras={serve.max_adapters}",
        "--lora-modules",
        *(f"{name}={uri}" for name, uri in serve.adapters.items()),
    ]


def _probes(model_name: str, startup_timeout_s: int) -> dict[str, Any]:
    """Startup probe sized for the model load; then readiness on the model, liveness on the server."""

    def http(path: str, period: int, failures: int, timeout: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": HTTP_PORT},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": timeout,
        }

    return {
        "startupProbe": http("/v2/health/live", _STARTUP_PERIOD_S, math.ceil(startup_timeout_s / _STARTUP_PERIOD_S), 5),
        "readinessProbe": http(f"/v2/models/{model_name}/ready", 10, 3, 5),
        # Generation runs off the event loop, so the server answers probes even under a long batch;
        # 3 × 30 s tolerates a loaded node without restarting a healthy pod.
        "livenessProbe": http("/v2/health/live", 30, 3, 10),
    }
