"""Serving, deployment and playground configs.

``serve`` is the predictor process (``kubellm serve``, locally or inside the KServe pod), ``deploy`` the
InferenceService around it and its rollout, ``playground`` the Gradio prompt playground.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from kubellm.config.base import StrictModel
from kubellm.config.secrets import Uri

# DNS-1035 label: InferenceService and Deployment names become Service names.
_K8S_NAME = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
#: A name a model or adapter is served under (OpenAI ``model``, KServe's ``/v1/models/<name>``).
SERVED_NAME = r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,127}$"
_SERVED_NAME = re.compile(SERVED_NAME)
# DNS-1123 subdomain: a Secret's name.
_K8S_SECRET_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"


class ServeConfig(StrictModel):
    """``kubellm serve``: the local/KServe predictor."""

    host: str = "127.0.0.1"
    """Bind address; loopback by default, ``0.0.0.0`` only inside a container."""
    port: int = Field(default=8080, ge=1, le=65535)
    """HTTP port."""
    model_name: str = Field(default="kubellm", pattern=SERVED_NAME)
    """Name under which the model is served (``/v1/models/<name>``, OpenAI ``model``); in a run config it
    defaults to ``tracking.registered_model``."""
    model: Uri | None = None
    """What to serve: a local directory (a merged Hugging Face model or a LoRA adapter directory), a
    ``models:/name@alias`` MLflow URI, or ``/mnt/models`` (what KServe's storage initializer fills in a
    pod). ``None``: ``models:/<tracking.registered_model>@champion``."""
    base_model: Uri | None = None
    """Base model of a LoRA adapter (a directory or a Hub id); ``None`` takes the base recorded in the
    adapter's ``adapter_config.json``."""
    adapters: dict[str, Uri] = {}
    """LoRA adapters served on the one base ``model`` (loaded once): name → a LoRA adapter directory or a
    ``models:/name@alias`` URI of a registered adapter (``kubellm serve --adapter NAME=URI`` adds more). A
    request picks one by its name (OpenAI ``model``, ``/v1/models/<name>:predict``,
    ``/v2/models/<name>/infer``); the base is served under ``model_name``. Rows of different adapters share
    one batch. Empty: ``model`` alone (an adapter given as ``model`` is merged into its base)."""
    max_lora_rank: int = Field(default=64, ge=1, le=1024)
    """Largest LoRA rank an adapter may have (vLLM's ``--max-lora-rank``); a larger one is refused."""
    max_adapters: int = Field(default=16, ge=1, le=1024)
    """Most adapters loaded at once (vLLM's ``--max-loras``); loading one more is refused."""
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """``auto`` picks CUDA when present, else the CPU."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 where the hardware runs it natively (generation is 1.5–1.75× faster in bf16 on
    these CPUs), fp32 elsewhere. Greedy answers can differ slightly between batch sizes in bf16."""
    max_batch_size: int = Field(default=8, ge=1, le=256)
    """Most requests generating together (rows of the batch); more wait in the queue."""
    batching: Literal["continuous", "static"] = "continuous"
    """``continuous``: a waiting request joins the running batch at the next decode step; ``static``: it
    waits until the whole batch has finished (kept for comparison: with 8 closed-loop clients its p99
    latency was 1.89× a request alone, see the README's serving benchmark)."""
    batch_wait_ms: float = Field(default=10.0, ge=0, le=1000)
    """When nothing is generating, how long the first request waits, at most, for others to start with it
    (clients of a finished batch come back within a few ms, and one prefill for all of them costs about
    one decode step; while a batch runs, requests join at the next step without waiting)."""
    max_queue: int = Field(default=64, ge=1)
    """Requests waiting beyond this many get a 503; one request with more prompts than this can never
    fit and gets a 400."""
    max_prompt_tokens: int = Field(default=2048, ge=1)
    """Longer prompts get a 400."""
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Request bodies larger than this get a 413 before they are read. The largest legitimate request
    at the defaults, 64 prompts of 2,048 token ids as JSON (at most 7 bytes an id), is ~0.9 MB; a 20 MB
    body used to take 26 s to refuse and left ~800 MB of memory behind."""
    max_logprobs: int = Field(default=20, ge=0, le=100)
    """Most alternatives a request may ask for per token (completions ``logprobs``, chat
    ``top_logprobs``), as vLLM's ``max_logprobs``; more gets a 400."""
    max_new_tokens: int = Field(default=512, ge=1)
    """Upper bound of a request's ``max_tokens`` (larger gets a 400)."""
    default_max_tokens: int = Field(default=128, ge=1)
    """Tokens generated when a request does not say (``max_tokens`` absent)."""
    model_repository_api: bool = False
    """Answer KServe's model-repository routes, ``POST /v2/repository/models/<name>/load|unload`` (stop and
    restart the generation engine; readiness is false while unloaded). Off: they answer 404, as anyone
    who can reach the pod could otherwise take the model offline. On: each call needs ``Authorization:
    Bearer <token>`` with the token from the environment variable ``KUBELLM_SERVE_ADMIN_TOKEN`` (a
    Kubernetes Secret through ``platform.*.secret_env``), and the server refuses to start without it. The
    same switch and token guard vLLM's run-time LoRA routes, ``POST /v1/load_lora_adapter`` and
    ``/v1/unload_lora_adapter``."""

    @model_validator(mode="after")
    def _token_limits(self) -> ServeConfig:
        if self.default_max_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) is greater than max_new_tokens ({self.max_new_tokens})"
            )
        for name in self.adapters:
            if not _SERVED_NAME.match(name):
                raise ValueError(
                    f"adapters: {name!r} is not a valid name (letters, digits, '-', '_', '.'; 128 characters at most)"
                )
            if name == self.model_name:
                raise ValueError(
                    f"adapters: {name!r} is the base model's name (model_name); name the adapter differently"
                )
        if len(self.adapters) > self.max_adapters:
            raise ValueError(f"adapters: {len(self.adapters)} adapters, more than max_adapters ({self.max_adapters})")
        return self


class DeployConfig(StrictModel):
    """``kubellm deploy``: the KServe InferenceService and its rollout (canary, smoke test, rollback)."""

    name: str | None = Field(default=None, pattern=_K8S_NAME)
    """InferenceService name; ``None`` uses the run name."""
    runtime: Literal["kubellm", "huggingface", "llm-inference-service"] = "kubellm"
    """``kubellm``: our predictor image (``platform.serving_image`` running ``kubellm serve``; serves a
    merged model or a LoRA adapter, KServe V1/V2 and an OpenAI-compatible API). ``huggingface``: KServe's
    own Hugging Face runtime (``modelFormat: huggingface``), for a merged model only.
    ``llm-inference-service``: KServe's ``LLMInferenceService`` (``serving.kserve.io/v1alpha2``, KServe
    0.20: vLLM behind llm-d's router) serving the base model once and LoRA adapters on it
    (``spec.model.lora``); ``kubellm deploy`` and the deploy step release a registered *adapter version*:
    add it as a candidate beside the champion, gate it by name, move the alias and ``champion`` or remove
    it (:mod:`kubellm.k8s.llmisvc`); a merged version is refused."""
    router_scheduler: bool = True
    """``llm-inference-service``: route through llm-d's scheduler (the endpoint picker: load- and
    LoRA-aware routing across replicas); ``false``: a plain HTTPRoute to the workload Service."""
    keda_prometheus_url: Uri | None = None
    """``runtime: kubellm`` with ``deployment_mode: RawDeployment``: scale the predictor with KEDA on its
    queue depth (``vllm:num_requests_waiting`` from this Prometheus, e.g.
    ``http://prometheus.monitoring:9090``): a ``ScaledObject`` on the predictor Deployment between
    ``min_replicas`` and ``max_replicas``, a replica per ``scale_target`` (default ``serve.max_batch_size``)
    waiting requests, and KServe told to leave autoscaling to it. ``None``: KServe's own autoscaler."""
    vllm_image: str | None = None
    """``llm-inference-service``: the vLLM image of the workload; ``None`` keeps the one of the cluster's
    ``LLMInferenceServiceConfig`` preset."""
    storage_uri: Uri | None = None
    """Where KServe's storage initializer fetches the model from into ``/mnt/models`` (``s3://``,
    ``gs://``, ``pvc://``, ``hf://``, ``https://``). The pipeline's deploy step passes the registered
    model's location; ``kubellm deploy --storage-uri`` overrides this. ``llm-inference-service``: the
    location of the adapter's base (``spec.model.uri``); ``None``: the base version's in the registry."""
    deployment_mode: Literal["Serverless", "RawDeployment"] | None = None
    """KServe deployment mode (annotation ``serving.kserve.io/deploymentMode``); ``None`` keeps the
    cluster's default. Canary traffic splitting needs ``Serverless`` (Knative revisions)."""
    min_replicas: int = Field(default=1, ge=0)
    """Fewest predictor pods (0 lets Serverless scale to zero: the first request then waits for a load)."""
    max_replicas: int = Field(default=1, ge=1)
    """Most predictor pods the autoscaler may run."""
    scale_metric: Literal["concurrency", "rps", "cpu", "memory"] = "concurrency"
    """What the autoscaler watches."""
    scale_target: int | None = Field(default=None, ge=1)
    """Target value of ``scale_metric`` per pod; ``None`` with ``concurrency`` uses
    ``serve.max_batch_size`` (a pod's batch is full at that many in-flight requests)."""
    canary_traffic_percent: int | None = Field(default=10, ge=0, le=100)
    """Share of traffic the new revision gets while it is smoke-tested when an InferenceService already
    exists; promoted to 100 % on success, 0 % and the previous spec restored on failure. ``None``: no
    canary (the new revision takes all traffic once ready; failure still restores the previous spec)."""
    request_timeout_s: int = Field(default=300, ge=1)
    """Predictor request timeout (KServe ``timeout``): long generations need more than the default 60 s."""
    startup_timeout_s: int = Field(default=1200, ge=30)
    """How long a predictor pod may take to download and load the model before its startup probe fails."""
    ready_timeout_s: float = Field(default=1800.0, gt=0)
    """How long the rollout waits for the InferenceService to become Ready."""
    poll_s: float = Field(default=5.0, gt=0)
    """Seconds between readiness checks during the rollout."""
    smoke_prompt: str = Field(default="Hello", min_length=1)
    """Prompt of the smoke request sent to the new revision before it is promoted."""
    smoke_max_tokens: int = Field(default=4, ge=1, le=64)
    """Tokens the smoke request generates."""
    benchmark_gate: bool = True
    """Before the alias moves, score the *served* model — the canary on a cluster, a predictor started on
    127.0.0.1 locally — on the evaluation's benchmarks (``evaluate.benchmarks``, through lm-eval's
    ``local-completions``) and roll back when a score falls more than ``max_served_benchmark_drop``
    points below the in-process evaluation of the same model: the model is judged as it is actually
    served (runtime, dtype, batching). No benchmarks configured: only the smoke request."""
    max_served_benchmark_drop: float = Field(default=2.0, ge=0, le=100)
    """Points (score × 100) a served benchmark score may fall below the evaluated one."""
    promote_alias: str = Field(default="champion", min_length=1)
    """Registry alias the deployed model version gets after a healthy rollout."""
    hf_args: list[str] = []
    """Extra arguments of KServe's Hugging Face runtime (``runtime: huggingface``), e.g.
    ``["--dtype=bfloat16"]``. ``--backend=huggingface`` is added when the placement has no GPU (vLLM needs one)."""
    playground: bool = True
    """Also create the playground Deployment + Service next to the InferenceService."""
    visibility: Literal["cluster-local", "external"] = "cluster-local"
    """``cluster-local``: the InferenceService answers only inside the cluster (KServe's
    ``networking.kserve.io/visibility`` label), as a predictor without authentication should;
    ``external``: it also gets an ingress URL."""

    @model_validator(mode="after")
    def _replicas(self) -> DeployConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is greater than max_replicas ({self.max_replicas})")
        return self


class PlaygroundConfig(StrictModel):
    """``kubellm playground``: a Gradio app for prompt engineering against OpenAI-compatible endpoints."""

    host: str = "127.0.0.1"
    """Bind address; loopback by default, ``0.0.0.0`` only inside a container."""
    port: int = Field(default=7860, ge=1, le=65535)
    """HTTP port."""
    endpoint: Uri | None = None
    """OpenAI-compatible base URL of model A. A bare ``http://host:port`` gets KServe's ``/openai/v1``
    prefix. ``None``: the local predictor, ``http://127.0.0.1:<serve.port>/openai/v1``."""
    model: str | None = None
    """Model name at ``endpoint``; ``None`` takes the first one the endpoint lists."""
    compare_endpoint: Uri | None = None
    """Base URL of model B, shown side by side on the same prompt (e.g. the base model); ``None``: A only."""
    compare_model: str | None = None
    """Model name at ``compare_endpoint``; ``None`` takes the first one it lists."""
    editable_endpoints: bool = True
    """Let the page's user type any endpoint URL (a laptop, on 127.0.0.1). ``false`` locks the page to
    ``endpoint``, ``compare_endpoint`` and ``allowed_endpoints``, checked on the server, so whoever reaches
    the page cannot make its host call other URLs (server-side request forgery). The cluster's playground
    pod is always locked."""
    allowed_endpoints: list[Uri] = []
    """Further OpenAI-compatible base URLs a locked page offers to choose from."""
    auth_secret: str | None = Field(default=None, pattern=_K8S_SECRET_NAME)
    """Kubernetes Secret (keys ``username`` and ``password``) holding the login the cluster's playground
    asks for; the pod gets them as ``KUBELLM_PLAYGROUND_USERNAME``/``PASSWORD`` (so does a laptop's
    ``kubellm playground``). ``None``: no login: reach the page only through ``kubectl port-forward``."""
    system_prompt: str = "You are a helpful assistant."
    """System prompt the page starts with."""
    temperature: float = Field(default=0.7, ge=0, le=2)
    """Initial sampling temperature (0 is greedy)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Initial nucleus-sampling probability mass."""
    max_tokens: int = Field(default=256, ge=1)
    """Initial number of tokens to generate per answer."""
    seed: int | None = None
    """Initial sampling seed (``None``: random)."""
    request_timeout_s: float = Field(default=120.0, gt=0)
    """Per-request timeout towards the endpoints; a slower endpoint is reported as down."""
    replicas: int = Field(default=1, ge=1)
    """Pods of the playground Deployment on a cluster."""
