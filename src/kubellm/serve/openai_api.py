"""OpenAI-compatible routes under ``/openai/v1`` (KServe's prefix): models, completions, chat completions.

Requests go through the same model, limits and batching engine as KServe V1/V2. Streaming is Server-Sent
Events (``data: {chunk}`` lines, then ``data: [DONE]``), with a final usage chunk when the request asks
for ``stream_options: {"include_usage": true}``. Unknown request fields are ignored, as OpenAI's own
clients send newer ones; fields that would change the answer and are not supported (``n > 1``,
``logprobs``, ``echo``, ``suffix``) are refused with a 400 rather than silently ignored.

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``:

======================================  ======  ==============================
request                                 status  code
======================================  ======  ==============================
body is not JSON / not an object        400     ``invalid_json``
a field has the wrong type / is missing 400     ``invalid_value``
prompt longer than max_prompt_tokens    400     ``context_length_exceeded``
max_tokens < 1 or > max_new_tokens      400     (param ``max_tokens``)
unknown ``model``                       404     ``model_not_found``
queue full (max_queue waiting)          503     ``overloaded``
======================================  ======  ==============================
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubellm.serve.engine import Completion, GenerationRequest
from kubellm.serve.predictor import InvalidRequest

if TYPE_CHECKING:
    from kubellm.serve.predictor import LLMModel

PREFIX = "/openai/v1"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | int | None = None
    min_tokens: int | None = None
    """vLLM's extension: suppress EOS until this many tokens (fixes generation length in benchmarks)."""


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts can be served by a text model
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def router(model: LLMModel) -> APIRouter:
    """The ``/openai/v1`` routes serving ``model``."""
    api = APIRouter(prefix=PREFIX, tags=["OpenAI"])
    created = int(time.time())

    def card() -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": created, "owned_by": "kubellm"}

    @api.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @api.get("/models/{model_id}")
    async def model_card(model_id: str) -> dict[str, Any]:
        _check_model(model, model_id)
        return card()

    @api.post("/completions", response_model=None)
    async def completions(request: Request) -> Any:
        req = await _parse(request, CompletionRequest)
        _check_common(model, req)
        if req.echo or req.suffix:
            raise InvalidRequest("echo and suffix are not supported", param="echo" if req.echo else "suffix")
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]
        params = _sampling(model, req, req.max_tokens)
        jobs = [model.encode_prompt(p, "prompt" if len(prompts) == 1 else f"prompt[{i}]") for i, p in enumerate(prompts)]
        submitted = [model.submit(ids, params) for ids in jobs]
        rid, name = f"cmpl-{uuid.uuid4().hex}", req.model or model.name
        if req.stream:
            return StreamingResponse(_stream_completions(submitted, rid, name, _usage_wanted(req)),
                                     media_type="text/event-stream")
        results = [await r.result() for r in submitted]
        return {
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
            "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                        for i, c in enumerate(results)],
            "usage": _usage(results),
        }

    @api.post("/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        req = await _parse(request, ChatRequest)
        _check_common(model, req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        params = _sampling(model, req, req.max_completion_tokens if req.max_completion_tokens is not None
                           else req.max_tokens)
        submitted = model.submit(model.encode_chat(messages), params)
        rid, name = f"chatcmpl-{uuid.uuid4().hex}", req.model or model.name
        if req.stream:
            return StreamingResponse(_stream_chat(submitted, rid, name, _usage_wanted(req)),
                                     media_type="text/event-stream")
        c = await submitted.result()
        return {
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason, "logprobs": None}],
            "usage": _usage([c]),
        }

    return api


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    body = await request.body()
    try:
        data = json.loads(body)
    except ValueError as err:
        raise InvalidRequest(f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"{loc}: {first['msg']}", param=loc, code="invalid_value") from None


def _check_model(model: LLMModel, name: str | None) -> None:
    if name is not None and name != model.name:
        raise InvalidRequest(f"The model '{name}' does not exist (this server serves '{model.name}')",
                             status=404, param="model", code="model_not_found")


def _check_common(model: LLMModel, req: _Request) -> None:
    _check_model(model, req.model)
    if req.n not in (None, 1):
        raise InvalidRequest("n: only n=1 is supported", param="n")
    if req.logprobs:
        raise InvalidRequest("logprobs are not supported", param="logprobs")


def _sampling(model: LLMModel, req: _Request, max_tokens: int | None) -> Any:
    return model.sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=req.stop,
                          seed=req.seed, min_tokens=req.min_tokens)


def _usage_wanted(req: _Request) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


def _usage(results: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in results)
    completion = sum(c.completion_tokens for c in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _guarded(requests: list[GenerationRequest], events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Stream ``events``; an error mid-stream becomes an error event; a client that leaves cancels."""
    try:
        async for event in events:
            yield event
        yield "data: [DONE]\n\n"
    except InvalidRequest as err:  # pragma: no cover - validation happens before streaming starts
        yield _sse({"error": {"message": str(err), "type": "invalid_request_error"}})
    except Exception as err:  # headers are sent: the error can only travel in the stream
        yield _sse({"error": {"message": f"generation failed: {err}", "type": "server_error"}})
    finally:
        for r in requests:
            r.cancelled = True  # no-op once finished; stops the row if the client went away


async def _stream_completions(requests: list[GenerationRequest], rid: str, name: str,
                              include_usage: bool) -> AsyncIterator[str]:
    async def events() -> AsyncIterator[str]:
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name}
        results = []
        for index, r in enumerate(requests):
            async for item in r.stream():
                if isinstance(item, Completion):
                    results.append(item)
                    choice = {"index": index, "text": "", "finish_reason": item.finish_reason, "logprobs": None}
                else:
                    choice = {"index": index, "text": item, "finish_reason": None, "logprobs": None}
                yield _sse({**head, "choices": [choice]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(results)})

    async for event in _guarded(requests, events()):
        yield event


async def _stream_chat(request: GenerationRequest, rid: str, name: str, include_usage: bool) -> AsyncIterator[str]:
    async def events() -> AsyncIterator[str]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name}
        yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
        async for item in request.stream():
            if isinstance(item, Completion):
                yield _sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": item.finish_reason}]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage([item])})
            else:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"content": item}, "finish_reason": None}]})

    async for event in _guarded([request], events()):
        yield event
