"""The predictor's HTTP app (KServe V1/V2 + OpenAI) and how it is run: ``kubellm serve`` or in a thread.

:func:`build_app` mounts KServe's own V1/V2 routes over a ``DataPlane`` holding our model (see
:mod:`kubellm.serve.predictor` for why) and the OpenAI routes, starts the batching engine with the app
and maps errors to status codes. One exception handler serves every route: on ``/openai/…`` the body is
OpenAI's ``{"error": {…}}``, elsewhere KServe's ``{"error": "…"}``; either way the server keeps serving.

A body over ``serve.max_request_bytes`` is answered 413 by :class:`_BodyLimit` before any route sees it,
decided from its ``Content-Length`` before a byte is read, or as soon as a chunked body passes the limit.
Parsing JSON holds the GIL, so only a bounded body keeps health probes answering within milliseconds. The
rest of a refused body is read and dropped (never stored) before the answer goes out, up to
``_LINGER_BYTES`` or ``_LINGER_S``: a server that answers and closes while the client is still sending
makes the kernel reset the connection, and the client sees "connection reset" instead of the 413 (seen
with 5 MB bodies under concurrent load). Beyond those bounds the connection is simply closed.

``/metrics`` is KServe's own Prometheus handler; :mod:`kubellm.serve.metrics` says what it shows.

:func:`serve` is ``kubellm serve``: load, then listen (uvicorn) on ``serve.host:serve.port``.
:class:`BackgroundServer` runs the same app on 127.0.0.1 and a free port in a daemon thread, for tests,
the benchmark and the playground's own checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from kubellm.errors import ServingError
from kubellm.log import get_logger
from kubellm.serve.engine import EngineOverloaded, EngineStopped
from kubellm.serve.predictor import InvalidRequest, LLMModel, kserve

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from kubellm.config.run import RunConfig

log = get_logger("kubellm.serve")


def build_app(model: LLMModel) -> FastAPI:
    """The FastAPI app serving a loaded ``model`` (its engine starts and stops with the app)."""
    from fastapi import FastAPI
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import metrics_handler
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    from kubellm.serve import metrics, openai_api

    if model.engine is None:
        raise ServingError(f"model {model.name} must be loaded before building the app")
    repository = ModelRepository()
    repository.update(model)
    dataplane = DataPlane(model_registry=repository)
    extension = ModelRepositoryExtension(model_registry=repository)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await model.engine.start()
        try:
            yield
        finally:
            await model.engine.stop()

    app = FastAPI(title="kubellm predictor", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, limit=model.cfg.max_request_bytes)
    # Added last, so outermost: it also counts the 413s of _BodyLimit.
    app.add_middleware(metrics.RequestMetrics, model_name=model.name)
    metrics.watch_engine(model.name, model.engine)
    app.add_api_route("/", dataplane.live, methods=["GET"])
    app.add_api_route("/metrics", metrics_handler, methods=["GET"])
    register_v1_endpoints(app, dataplane, extension)
    register_v2_endpoints(app, dataplane, extension)
    app.include_router(openai_api.router(model))
    _add_error_handlers(app)
    return app


# (status, OpenAI error type, OpenAI code) of KServe's exceptions, as KServe's own handlers answer them.
def _kserve_statuses() -> dict[type, tuple[int, str, str | None]]:
    errors = kserve.errors
    return {
        errors.InvalidInput: (400, "invalid_request_error", None),
        errors.ModelNotFound: (404, "invalid_request_error", "model_not_found"),
        errors.ModelNotReady: (503, "server_error", None),
        errors.ServerNotReady: (503, "server_error", None),
        errors.ServerNotLive: (503, "server_error", None),
        errors.UnsupportedProtocol: (501, "invalid_request_error", None),
        NotImplementedError: (501, "invalid_request_error", None),
    }


def _add_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError

    statuses = _kserve_statuses()

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        param = code = None
        if isinstance(exc, InvalidRequest):
            status, kind, param, code = exc.status, "invalid_request_error", exc.param, exc.code
        elif isinstance(exc, EngineOverloaded | EngineStopped):
            status, kind, code = 503, "server_error", "overloaded"
        elif isinstance(exc, RequestValidationError):
            status, kind, code = 400, "invalid_request_error", "invalid_value"
            exc = ServingError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
        elif type(exc) in statuses:
            status, kind, code = statuses[type(exc)]
        else:
            log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
            status, kind = 500, "server_error"
        return _error(request, status, str(exc) or type(exc).__name__, kind, param, code)

    for exc_type in (InvalidRequest, EngineOverloaded, EngineStopped, RequestValidationError, *statuses, Exception):
        app.add_exception_handler(exc_type, handle)


def _error(request: Request, status: int, message: str, kind: str, param: str | None,
           code: str | None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    return JSONResponse(_error_body(request.url.path, message, kind, param, code), status_code=status)


def _error_body(path: str, message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    if path.startswith("/openai/"):
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"error": message}


# How much of a refused body is read and dropped so that the client can read the 413 (see the module doc).
_LINGER_BYTES = 256 * 1024 * 1024
_LINGER_S = 10.0


class _TooLarge(Exception):
    """Raised into the app by :class:`_BodyLimit`'s ``receive`` once a body passes the limit."""


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 and is never read to its end."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.limit
        received, refused, replied = 0, False, False

        # The app still runs (routing labels the request's metrics) but its first read of the body fails:
        # at once when the declared length is too large, when the count passes the limit otherwise.
        async def limited_receive() -> dict:
            nonlocal received, refused
            if too_large:
                refused = True
                raise _TooLarge
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                refused = True
                raise _TooLarge
            return message

        async def checked_send(message: dict) -> None:
            nonlocal replied
            if not refused:  # whatever the app makes of the exception, the answer is our 413
                replied = True
                await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited_receive, checked_send)
        if refused and not replied:
            await _discard(receive)
            await self._refuse(scope, send, f"{int(declared)} bytes" if too_large else "a chunked body")

    async def _refuse(self, scope: dict, send: Any, what: str) -> None:
        message = (f"the request body ({what}) is larger than this server's limit of {self.limit} bytes "
                   "(serve.max_request_bytes)")
        body = json.dumps(_error_body(scope["path"], message, "invalid_request_error", None,
                                      "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def _discard(receive: Any) -> None:
    """Read and drop the rest of a request body, within ``_LINGER_BYTES`` and ``_LINGER_S``."""
    loop = asyncio.get_running_loop()
    deadline, left = loop.time() + _LINGER_S, _LINGER_BYTES
    while left > 0:
        try:
            message = await asyncio.wait_for(receive(), deadline - loop.time())
        except TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        left -= len(message.get("body", b""))


def load_model(run_cfg: RunConfig, model_ref: str | None = None, base_model: str | None = None) -> LLMModel:
    """The configured model, loaded: ``model_ref`` > ``serve.model`` > ``models:/<registered>@champion``."""
    serve = run_cfg.serve
    ref = model_ref or serve.model or f"models:/{run_cfg.tracking.registered_model}@champion"
    from kubellm.serve.metrics import EngineMetrics

    model = LLMModel(serve, ref, base_model=base_model or serve.base_model, tracking=run_cfg.tracking,
                     workdir=run_cfg.workdir)
    model.load(observer=EngineMetrics(model.name))
    return model


def serve(run_cfg: RunConfig, *, model_ref: str | None = None, base_model: str | None = None,
          port: int | None = None) -> None:
    """``kubellm serve``: load the model, then serve until SIGINT/SIGTERM."""
    import uvicorn

    t0 = time.perf_counter()
    model = load_model(run_cfg, model_ref, base_model)
    app = build_app(model)
    host, port = run_cfg.serve.host, port or run_cfg.serve.port
    log.info("serving %s as %r on http://%s:%d (loaded in %.1f s): /v1/models/%s:predict, "
             "/v2/models/%s/infer, /openai/v1/chat/completions, /metrics", model.description, model.name, host, port,
             time.perf_counter() - t0, model.name, model.name)
    # Generation can take minutes: give running requests 30 s to finish on shutdown.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)


class BackgroundServer:
    """An ASGI app served by uvicorn on ``host`` and a free port in a daemon thread.

    ``with BackgroundServer(app) as server: httpx.get(server.url + "/v2/health/live")``; leaving the block
    stops it (and the app's lifespan: the engine) within ``stop_timeout_s``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, start_timeout_s: float = 30.0,
                 stop_timeout_s: float = 10.0) -> None:
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     lifespan="on", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, name="kubellm-uvicorn", daemon=True)
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServingError(f"the server on {self.host} did not start within {self.start_timeout_s:g} s")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(self.stop_timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
