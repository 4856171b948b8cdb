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

A body nested deeper than ``MAX_JSON_DEPTH`` brackets is answered 400 by :class:`_JsonDepth` before any
parser sees it: Python's ``json`` recurses once per level, so 100,000 nested ``[`` answered 500
(``maximum recursion depth exceeded``) on the OpenAI routes and a bare FastAPI 400 on V2.

Where KServe's own V2 routes answer wrong for this server, ours are mounted first and KServe's copies
left out (:class:`_Routers`): readiness (``/v2/health/ready``) is whether the model can answer
(KServe's is always true, so an unloaded model or a dead engine stayed "ready" and no probe acted), the
model-repository routes (load/unload) are off unless ``serve.model_repository_api`` and then need the
admin token (KServe's let anyone unload the model), and ``/v2/models/<name>/versions/<v>/…`` answers
for the one version served, ``SERVED_VERSION`` (KServe answers 501).

``/metrics`` is KServe's own Prometheus handler; :mod:`kubellm.serve.metrics` says what it shows.

:func:`serve` is ``kubellm serve``: load, then listen (uvicorn) on ``serve.host:serve.port``.
:class:`BackgroundServer` runs the same app on 127.0.0.1 and a free port in a daemon thread, for tests,
the benchmark and the playground's own checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import re
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

#: Deepest nesting of brackets a request body may have. Real requests nest 4-6 levels (chat messages with
#: content parts, V2 tensors of a few dimensions); Python's ``json`` handles ~1,000 before its recursion
#: limit, and KServe's orjson 1,024.
MAX_JSON_DEPTH = 64
#: The environment variable holding the bearer token of the model-repository routes: never the config,
#: which is compiled and logged.
ADMIN_TOKEN_ENV = "KUBELLM_SERVE_ADMIN_TOKEN"
#: The version ``/v2/models/<name>/versions/<v>/…`` answers for: a predictor serves one version of one
#: model, named "1" as Triton names a model's only version (the registry's version is the
#: InferenceService's label, which a pod serving ``/mnt/models`` does not see).
SERVED_VERSION = "1"


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
    for view in model.views.values():
        repository.update(view)

    def follow(name: str, view: LLMModel | None) -> None:  # adapters loaded and unloaded at run time
        if view is None:
            repository.models.pop(name, None)
        else:
            repository.update(view)

    model.listeners.append(follow)
    dataplane = DataPlane(model_registry=repository)
    extension = ModelRepositoryExtension(model_registry=repository)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await model.engine.start()
        try:
            yield
        finally:
            await model.engine.stop()

    token = _admin_token(model)
    app = FastAPI(title="kubellm predictor", lifespan=lifespan, docs_url=None, redoc_url=None)
    # Middleware added later runs earlier: the version check, then the body limit (so the depth check
    # only ever holds a bounded body), then the depth check.
    app.add_middleware(_JsonDepth, limit=MAX_JSON_DEPTH)
    app.add_middleware(_BodyLimit, limit=model.cfg.max_request_bytes)
    app.add_middleware(_Versions)
    # Added last, so outermost: it also counts the 413s of _BodyLimit.
    app.add_middleware(metrics.RequestMetrics, model_name=model.name)
    metrics.watch_engine(model.name, model.engine, lambda: [model.name, *model.views])
    app.add_api_route("/", dataplane.live, methods=["GET"])
    app.add_api_route("/metrics", metrics_handler, methods=["GET"])
    _add_v2_overrides(app, model, dataplane, repository, token)
    kserve_routes = _Routers()
    register_v1_endpoints(kserve_routes, dataplane, extension)
    register_v2_endpoints(kserve_routes, dataplane, extension)
    kserve_routes.include_into(app)
    app.include_router(openai_api.router(model))
    _add_error_handlers(app)
    return app


def _admin_token(model: LLMModel) -> str | None:
    """The model-repository routes' token, ``None`` while they are off; on without a token is refused."""
    if not model.cfg.model_repository_api:
        return None
    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    if not token:
        raise ServingError(
            f"serve.model_repository_api is on but {ADMIN_TOKEN_ENV} is not set: the load/unload "
            "routes need a token (set the variable from a Kubernetes Secret, or turn the option off)"
        )
    return token


def _add_v2_overrides(app: FastAPI, model: LLMModel, dataplane: Any, repository: Any, token: str | None) -> None:
    """The V2 routes where KServe's answer is wrong for this server (see the module doc), mounted before
    KServe's own so that they win."""
    from fastapi import Header

    from kubellm.serve import openai_api

    errors = kserve.errors
    on = token is not None

    async def ready() -> dict[str, bool]:
        if not await repository.is_model_ready(model.name):
            raise errors.ServerNotReady(f"model {model.name} cannot answer (unloaded, or its engine stopped)")
        return {"ready": True}

    async def metadata() -> dict[str, Any]:
        return {**dataplane.metadata(), "extensions": ["model_repository_extension"] if on else []}

    def guard(authorization: str | None) -> None:
        if not on:
            raise InvalidRequest(
                "the model repository API (load/unload) is off on this server (serve.model_repository_api)", status=404
            )
        if not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
            raise InvalidRequest(
                f"load/unload need 'Authorization: Bearer <token>' (the token in {ADMIN_TOKEN_ENV} of the server)",
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check(name: str, authorization: str | None) -> None:
        guard(authorization)
        if name != model.name:
            raise errors.ModelNotFound(name)

    async def load(model_name: str, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        check(model_name, authorization)
        await model.engine.start()
        repository.update(model)
        log.warning("model %s loaded through the model repository API", model.name)
        return {"name": model_name, "load": True}

    async def unload(model_name: str, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        check(model_name, authorization)
        repository.models.pop(model.name, None)
        # Waiting requests fail with a 503, running ones finish; readiness is false until a load.
        await model.engine.stop()
        log.warning("model %s unloaded through the model repository API", model.name)
        return {"name": model_name, "unload": True}

    app.include_router(openai_api.lora_router(model, guard, on))
    app.add_api_route("/v2", metadata, methods=["GET"])
    app.add_api_route("/v2/health/ready", ready, methods=["GET"])
    app.add_api_route("/v2/repository/models/{model_name}/load", load, methods=["POST"], include_in_schema=on)
    app.add_api_route("/v2/repository/models/{model_name}/unload", unload, methods=["POST"], include_in_schema=on)


class _Routers:
    """Stands in for the app in KServe's ``register_v1/v2_endpoints`` (all they do with it is include a
    router), so that KServe's routes that :func:`_add_v2_overrides` replaces can be left out: the OpenAPI
    document then lists what is actually served."""

    def __init__(self) -> None:
        self.routers: list[Any] = []

    def include_router(self, router: Any) -> None:
        self.routers.append(router)

    def include_into(self, app: FastAPI) -> None:
        ours = {
            (route.path, frozenset(route.methods)) for route in app.router.routes if getattr(route, "methods", None)
        }
        for router in self.routers:
            router.routes[:] = [r for r in router.routes if (r.path, frozenset(r.methods)) not in ours]
            app.include_router(router)


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
        response = _error(request, status, str(exc) or type(exc).__name__, kind, param, code)
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    for exc_type in (InvalidRequest, EngineOverloaded, EngineStopped, RequestValidationError, *statuses, Exception):
        app.add_exception_handler(exc_type, handle)


def _error(request: Request, status: int, message: str, kind: str, param: str | None, code: str | None) -> JSONResponse:
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
        await _answer(
            scope,
            send,
            _Refusal(
                413,
                f"the request body ({what}) is larger than this server's limit of "
                f"{self.limit} bytes (serve.max_request_bytes)",
                "request_too_large",
            ),
            headers=((b"connection", b"close"),),
        )


class _Refusal(Exception):
    """An answer a middleware gives instead of the app: ``status`` and a one-line message."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


async def _answer(scope: dict, send: Any, err: _Refusal, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps(_error_body(scope["path"], str(err), "invalid_request_error", None, err.code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


# A JSON string (escapes included) as one match, so brackets inside strings never count.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON document (brackets inside strings do not count).

    Linear and in C (a regular expression and numpy): 4 MB took 30-70 ms here, 180 ms for a string of
    nothing but escapes, with the GIL held about as long as parsing the body would.
    """
    import numpy as np

    step = np.zeros(256, dtype=np.int32)  # what each byte does to the depth
    step[[ord("["), ord("{")]], step[[ord("]"), ord("}")]] = 1, -1
    text = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    return int(np.cumsum(step[text]).max(initial=0))


class _JsonDepth:
    """ASGI middleware: a request body nested deeper than ``limit`` is answered 400 before any parser
    sees it. The body is read here (already bounded by :class:`_BodyLimit`) and handed on as it came;
    only a body with more than ``limit`` opening brackets in all is measured."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        messages, chunks = [], []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # A V2 binary request is a JSON header of this many bytes, then raw tensor bytes.
        header = dict(scope["headers"]).get(b"inference-header-content-length", b"")
        document = body[: int(header)] if header.isdigit() else body
        if document.count(b"[") + document.count(b"{") > self.limit and json_depth(document) > self.limit:
            return await _answer(
                scope,
                send,
                _Refusal(
                    400,
                    f"the request body is JSON nested deeper than this server's limit of {self.limit} levels",
                    "invalid_json",
                ),
            )
        if messages[-1]["type"] == "http.request":
            messages = [{"type": "http.request", "body": body, "more_body": False}]
        pending = iter(messages)

        async def replayed() -> dict:
            message = next(pending, None)
            return message if message is not None else await receive()

        await self.app(scope, replayed, send)


# /v2/models/<name>/versions/<version>[/ready|/infer]
_VERSIONED = re.compile(r"^(/v2/models/[^/]+)/versions/([^/]+)(/ready|/infer)?$")


class _Versions:
    """ASGI middleware: ``/v2/models/<name>/versions/<v>/…`` is the unversioned route when ``v`` is
    :data:`SERVED_VERSION`, a 404 naming the served version otherwise (KServe's routes answer 501)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        match = _VERSIONED.match(scope["path"]) if scope["type"] == "http" else None
        if match is not None:
            base, version, rest = match.groups()
            if version != SERVED_VERSION:
                return await _answer(
                    scope,
                    send,
                    _Refusal(
                        404,
                        f"{base.rsplit('/', 1)[-1]}: no version {version!r} here (this server serves version "
                        f"{SERVED_VERSION} only)",
                        "model_not_found",
                    ),
                )
            scope["path"] = base + (rest or "")
            scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)


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


def load_model(
    run_cfg: RunConfig,
    model_ref: str | None = None,
    base_model: str | None = None,
    adapters: dict[str, str] | None = None,
) -> LLMModel:
    """The configured model, loaded: ``model_ref`` > ``serve.model`` > ``models:/<registered>@champion``,
    with ``serve.adapters`` and ``adapters`` on it."""
    serve = run_cfg.serve
    ref = model_ref or serve.model or f"models:/{run_cfg.tracking.registered_model}@champion"
    from kubellm.serve.metrics import EngineMetrics

    model = LLMModel(
        serve,
        ref,
        base_model=base_model or serve.base_model,
        tracking=run_cfg.tracking,
        workdir=run_cfg.workdir,
        extra_adapters=adapters,
    )
    model.load(observer=EngineMetrics(model.name))
    return model


def serve(
    run_cfg: RunConfig,
    *,
    model_ref: str | None = None,
    base_model: str | None = None,
    port: int | None = None,
    adapters: dict[str, str] | None = None,
) -> None:
    """``kubellm serve``: load the model (and its adapters), then serve until SIGINT/SIGTERM."""
    import uvicorn

    t0 = time.perf_counter()
    model = load_model(run_cfg, model_ref, base_model, adapters)
    app = build_app(model)
    host, port = run_cfg.serve.host, port or run_cfg.serve.port
    log.info(
        "serving %s as %r on http://%s:%d (loaded in %.1f s): /v1/models/%s:predict, "
        "/v2/models/%s/infer, /openai/v1/chat/completions, /metrics",
        model.description,
        model.name,
        host,
        port,
        time.perf_counter() - t0,
        model.name,
        model.name,
    )
    if model.views:
        log.info(
            "adapters on %s: %s", model.name, ", ".join(f"{n} ({v.adapter.source})" for n, v in model.views.items())
        )
    # Generation can take minutes: give running requests 30 s to finish on shutdown.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)


class BackgroundServer:
    """An ASGI app served by uvicorn on ``host`` and a free port in a daemon thread.

    ``with BackgroundServer(app) as server: httpx.get(server.url + "/v2/health/live")``; leaving the block
    stops it (and the app's lifespan: the engine) within ``stop_timeout_s``.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        import uvicorn

        self._server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        )
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
