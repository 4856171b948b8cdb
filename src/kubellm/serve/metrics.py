"""Prometheus metrics of the predictor at ``/metrics``, the way KServe's own model server exposes them.

KServe 0.21's ``ModelServer`` serves ``/metrics`` with ``kserve.protocol.rest.server.metrics_handler`` over
prometheus_client's global ``REGISTRY``, where ``kserve.Model`` already records its latency histograms
(``request_predict_seconds{model_name}`` and friends) for every V1/V2 call. The predictor mounts that same
handler and registers its own series on the same registry, so one scrape of the pod (the InferenceService
carries KServe's ``serving.kserve.io/enable-prometheus-scraping`` annotation) gets both:

=============================================  =========  ===============================================
metric                                         type       what
=============================================  =========  ===============================================
``kubellm_requests_total``                     counter    HTTP requests by ``route`` (the path template,
                                                          e.g. ``/openai/v1/completions``), ``method``,
                                                          ``status``
``kubellm_request_duration_seconds``           histogram  their latency by ``route`` and ``method``
``kubellm_queue_requests``                     gauge      requests waiting for a batch
``kubellm_running_requests``                   gauge      requests in the batch being generated
``kubellm_batch_size``                         histogram  requests per batch
``kubellm_prompt_tokens_total``                counter    prompt tokens processed
``kubellm_generation_tokens_total``            counter    tokens generated
``kubellm_time_to_first_token_seconds``        histogram  from queueing a request to its first token
=============================================  =========  ===============================================

Every series carries ``model_name`` (KServe's label): the engine's series the name the request was
served under (the base's or an adapter's), the HTTP series the base's. Routes are labelled by template,
never by the raw path: a scanner probing random URLs adds one ``unmatched`` series, not one per URL.
Latency buckets span 5 ms (a health probe) to 5 min (``deploy.request_timeout_s``' default).

**vLLM's names** too, so KEDA triggers, dashboards and llm-d's endpoint picker written for vLLM read this
predictor unchanged, each with ``model_name`` = the base or the adapter a request was for:

=============================================  =========  ===============================================
``vllm:num_requests_running``                  gauge      requests in the batch
``vllm:num_requests_waiting``                  gauge      requests queued for it
``vllm:time_to_first_token_seconds``           histogram  from queueing a request to its first token
``vllm:e2e_request_latency_seconds``           histogram  from queueing a request to its end
``vllm:prompt_tokens_total``                   counter    prompt tokens processed
``vllm:generation_tokens_total``               counter    tokens generated
=============================================  =========  ===============================================

The two gauges are read from the engine at scrape time, one series per served name (0 when idle, so a
query for an adapter finds its series before its first request; an unloaded adapter's series goes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from kubellm.serve.engine import EngineObserver, GenerationEngine

_LABEL = "model_name"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "kubellm_requests",
    "HTTP requests of the predictor by route, method and status",
    [_LABEL, "route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "kubellm_request_duration_seconds",
    "HTTP request latency of the predictor by route",
    [_LABEL, "route", "method"],
    buckets=_LATENCY,
)
QUEUE = Gauge("kubellm_queue_requests", "Requests waiting for a batch", [_LABEL])
RUNNING = Gauge("kubellm_running_requests", "Requests in the batch being generated", [_LABEL])
BATCH_SIZE = Histogram(
    "kubellm_batch_size", "Requests per generation batch", [_LABEL], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
PROMPT_TOKENS = Counter("kubellm_prompt_tokens", "Prompt tokens processed", [_LABEL])
GENERATION_TOKENS = Counter("kubellm_generation_tokens", "Tokens generated", [_LABEL])
FIRST_TOKEN_SECONDS = Histogram(
    "kubellm_time_to_first_token_seconds", "From queueing a request to its first token", [_LABEL], buckets=_LATENCY
)
VLLM_FIRST_TOKEN_SECONDS = Histogram(
    "vllm:time_to_first_token_seconds", "Time to first token in seconds (vLLM's name)", [_LABEL], buckets=_LATENCY
)
VLLM_E2E_SECONDS = Histogram(
    "vllm:e2e_request_latency_seconds",
    "End-to-end request latency in seconds (vLLM's name)",
    [_LABEL],
    buckets=_LATENCY,
)
VLLM_PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Prompt tokens processed (vLLM's name)", [_LABEL])
VLLM_GENERATION_TOKENS = Counter("vllm:generation_tokens", "Generation tokens processed (vLLM's name)", [_LABEL])


class EngineMetrics(EngineObserver):
    """The engine's reports as Prometheus series of one served model and its adapters (an adapter's
    requests are labelled with the adapter's name)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.batch_size = BATCH_SIZE.labels(model_name)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def first_token(self, seconds: float, adapter: str | None) -> None:
        name = adapter or self.model_name
        FIRST_TOKEN_SECONDS.labels(name).observe(seconds)
        VLLM_FIRST_TOKEN_SECONDS.labels(name).observe(seconds)

    def tokens(self, prompt: int, generated: int, adapter: str | None) -> None:
        name = adapter or self.model_name
        if prompt:
            PROMPT_TOKENS.labels(name).inc(prompt)
            VLLM_PROMPT_TOKENS.labels(name).inc(prompt)
        if generated:
            GENERATION_TOKENS.labels(name).inc(generated)
            VLLM_GENERATION_TOKENS.labels(name).inc(generated)

    def finished(self, seconds: float, adapter: str | None) -> None:
        VLLM_E2E_SECONDS.labels(adapter or self.model_name).observe(seconds)


class _RequestGauges:
    """``vllm:num_requests_running|waiting`` per served name, read from the engines at scrape time."""

    def __init__(self) -> None:
        self.engines: dict[int, tuple[str, GenerationEngine, Callable[[], list[str]]]] = {}
        """By ``id(engine)``: ``(base name, engine, served names)``."""

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the batch (vLLM's name)", labels=[_LABEL])
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting for the batch (vLLM's name)", labels=[_LABEL]
        )
        totals: dict[str, tuple[int, int]] = {}
        for base, engine, names in list(self.engines.values()):
            if not engine.accepting:  # stopped (unloaded): it serves nothing
                continue
            load = engine.load_by_adapter()
            for name in names():
                now, queued = load.get(None if name == base else name, (0, 0))
                before = totals.get(name, (0, 0))
                totals[name] = (before[0] + now, before[1] + queued)
        for name, (now, queued) in totals.items():
            running.add_metric([name], now)
            waiting.add_metric([name], queued)
        yield running
        yield waiting

    def describe(self) -> list:
        return []  # collected at scrape time only


_GAUGES = _RequestGauges()
REGISTRY.register(_GAUGES)


def watch_engine(model_name: str, engine: GenerationEngine, names: Callable[[], list[str]] | None = None) -> None:
    """Queue depth and running batch read from ``engine`` at scrape time; ``names()`` lists the names
    served on it (the base's first; default: ``model_name`` alone)."""
    QUEUE.labels(model_name).set_function(lambda: engine.queued)
    RUNNING.labels(model_name).set_function(lambda: engine.running)
    _GAUGES.engines[id(engine)] = (model_name, engine, names or (lambda: [model_name]))


class RequestMetrics:
    """ASGI middleware counting and timing every HTTP request by route template."""

    def __init__(self, app: Any, model_name: str) -> None:
        self.app, self.model_name = app, model_name

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # unless the app says otherwise: an exception that escapes is answered 500

        async def record_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, record_status)
        finally:
            # The router records the matched route in the scope; a 404 has none.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            REQUEST_SECONDS.labels(self.model_name, route, method).observe(time.perf_counter() - t0)
            REQUESTS.labels(self.model_name, route, method, str(status)).inc()
