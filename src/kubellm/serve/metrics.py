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

Every series carries ``model_name`` (KServe's label). Routes are labelled by template, never by the raw
path: a scanner probing random URLs adds one ``unmatched`` series, not one per URL. Latency buckets span
5 ms (a health probe) to 5 min (``deploy.request_timeout_s``' default).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from kubellm.serve.engine import EngineObserver, GenerationEngine

_LABEL = "model_name"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("kubellm_requests", "HTTP requests of the predictor by route, method and status",
                   [_LABEL, "route", "method", "status"])
REQUEST_SECONDS = Histogram("kubellm_request_duration_seconds", "HTTP request latency of the predictor by route",
                            [_LABEL, "route", "method"], buckets=_LATENCY)
QUEUE = Gauge("kubellm_queue_requests", "Requests waiting for a batch", [_LABEL])
RUNNING = Gauge("kubellm_running_requests", "Requests in the batch being generated", [_LABEL])
BATCH_SIZE = Histogram("kubellm_batch_size", "Requests per generation batch", [_LABEL],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
PROMPT_TOKENS = Counter("kubellm_prompt_tokens", "Prompt tokens processed", [_LABEL])
GENERATION_TOKENS = Counter("kubellm_generation_tokens", "Tokens generated", [_LABEL])
FIRST_TOKEN_SECONDS = Histogram("kubellm_time_to_first_token_seconds", "From queueing a request to its first token",
                                [_LABEL], buckets=_LATENCY)


class EngineMetrics(EngineObserver):
    """The engine's reports as Prometheus series of one served model."""

    def __init__(self, model_name: str) -> None:
        self.batch_size = BATCH_SIZE.labels(model_name)
        self.prompt_tokens = PROMPT_TOKENS.labels(model_name)
        self.generation_tokens = GENERATION_TOKENS.labels(model_name)
        self.first_token_seconds = FIRST_TOKEN_SECONDS.labels(model_name)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def first_token(self, seconds: float) -> None:
        self.first_token_seconds.observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generation_tokens.inc(generated)


def watch_engine(model_name: str, engine: GenerationEngine) -> None:
    """Queue depth and running batch read from ``engine`` at scrape time."""
    QUEUE.labels(model_name).set_function(lambda: engine.queued)
    RUNNING.labels(model_name).set_function(lambda: engine.running)


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

