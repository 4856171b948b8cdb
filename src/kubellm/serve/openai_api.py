"""OpenAI-compatible routes under ``/openai/v1`` (KServe's prefix): models, completions, chat completions.

Requests go through the same model, limits and batching engine as KServe V1/V2. Streaming is Server-Sent
Events (``data: {chunk}`` lines, then ``data: [DONE]``), with a final usage chunk when the request asks
for ``stream_options: {"include_usage": true}``. Unknown request fields are ignored, as OpenAI's own
clients send newer ones; fields that would change the answer and are not implemented (``tools``,
``response_format``, ``best_of``, ``top_k``, ``suffix`` …, see ``_NEUTRAL``) are refused with a 400
naming the field unless they hold the value that changes nothing. ``presence_penalty``,
``frequency_penalty``, vLLM's ``repetition_penalty``, ``logit_bias`` and ``n`` (up to 16 choices per
prompt, not streamed on chat) are honoured as vLLM honours them (:func:`kubellm.serve.engine._process`).

Log-probabilities (:mod:`kubellm.serve.logprobs`) follow OpenAI's legacy completions and vLLM, which is
what lm-evaluation-harness's ``local-completions`` reads: completions ``logprobs: k`` gives ``tokens``,
``token_logprobs``, ``top_logprobs`` (the top ``k`` plus the chosen token) and ``text_offset`` (into the
returned ``text``); ``echo: true`` puts the prompt in front, its first token's log-probability ``null``,
and allows ``max_tokens: 0``. Chat takes ``logprobs: true`` and ``top_logprobs: k`` and answers
``choices[].logprobs.content``. ``k`` is capped by ``serve.max_logprobs``; not with ``stream``.

A non-streaming request whose client disconnects cancels its prompts, as a streaming one does: the
handler watches the connection while it waits (answered 499, which only the access log sees).

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``:

======================================  ======  ==============================
request                                 status  code
======================================  ======  ==============================
body is not JSON / not an object        400     ``invalid_json``
body nested deeper than 64 levels       400     ``invalid_json``
a field has the wrong type / is missing 400     ``invalid_value``
prompt longer than max_prompt_tokens    400     ``context_length_exceeded``
body over max_request_bytes             413     ``request_too_large``
max_tokens < 1 or > max_new_tokens      400     (param ``max_tokens``; 0 allowed with ``echo``)
more prompts than max_queue             400     (param ``prompt``)
a field not implemented (``tools`` …)   400     ``unsupported_field``
logprobs above max_logprobs             400     (param ``logprobs``)
unknown ``model``                       404     ``model_not_found``
queue full (max_queue waiting)          503     ``overloaded``
======================================  ======  ==============================
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from kubellm.config.serve import SERVED_NAME
from kubellm.errors import ServingError
from kubellm.log import get_logger
from kubellm.serve.engine import Completion, GenerationRequest, SamplingParams
from kubellm.serve.logprobs import TokenLogprob
from kubellm.serve.predictor import InvalidRequest, results_of

if TYPE_CHECKING:
    from kubellm.serve.predictor import LLMModel

log = get_logger("kubellm.serve")

PREFIX = "/openai/v1"
_SERVED_NAME = re.compile(SERVED_NAME)


# Fields that would change the answer and are not implemented, with the values that change nothing (some
# clients send every field with its default): anything else is refused with a 400 naming the field.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "echo": (None, False),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "top_k": (None, 0, -1),
    "min_p": (None, 0),
    "ignore_eos": (None, False),
    "stop_token_ids": (None, []),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
}


class _Request(BaseModel):
    # Unknown fields are kept (not declared) so that _refuse_unsupported can see them.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    min_tokens: int | None = None
    """vLLM's extension: suppress EOS until this many tokens (fixes generation length in benchmarks)."""
    n: int = Field(default=1, ge=1, le=16)
    """Choices per prompt: each is generated as its own request (a seeded one with ``seed + j``)."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: StrictInt | None = None


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
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None


def router(base: LLMModel) -> APIRouter:
    """The ``/openai/v1`` routes serving ``base`` and its adapters (the request's ``model`` picks one)."""
    api = APIRouter(prefix=PREFIX, tags=["OpenAI"])
    created = int(time.time())

    def card(m: LLMModel) -> dict[str, Any]:
        # vLLM's model card: an adapter's root is where it was loaded from, its parent the base's name.
        return {
            "id": m.name,
            "object": "model",
            "created": created,
            "owned_by": "kubellm",
            "root": m.source,
            "parent": None if m.adapter is None else base.name,
            "max_model_len": m.cfg.max_prompt_tokens + m.cfg.max_new_tokens,
        }

    @api.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(base), *(card(v) for v in base.views.values())]}

    @api.get("/models/{model_id}")
    async def model_card(model_id: str) -> dict[str, Any]:
        return card(base.lookup(model_id))

    @api.post("/completions", response_model=None)
    async def completions(request: Request) -> Any:
        req = await _parse(request, CompletionRequest)
        model = _check_common(base, req)
        if req.stream and (req.echo or req.logprobs is not None):
            raise InvalidRequest("echo and logprobs are not supported with stream", param="stream")
        prompts = (
            req.prompt
            if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int)
            else [req.prompt]
        )
        params = _sampling(
            model,
            req,
            req.max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo else None,
            allow_no_tokens=req.echo,
        )
        model.check_prompt_count(len(prompts) * req.n, "n" if req.n > 1 else "prompt")
        unique = await model.encode_prompts(prompts)
        prompt_tokens = sum(map(len, unique))
        # n choices per prompt, in OpenAI's order (prompt i's choices are i*n … i*n+n-1).
        prompts, ids = [p for p in prompts for _ in range(req.n)], [i for i in unique for _ in range(req.n)]
        rid, name = f"cmpl-{uuid.uuid4().hex}", req.model or model.name
        if params.max_tokens == 0 and params.prompt_logprobs is None:
            results = [Completion("", "length", len(i), 0) for i in ids]  # echo alone: nothing to compute
        else:
            submitted = model.submit_all(list(zip(ids, _copies(params, req.n) * len(unique), strict=True)))
            if req.stream:
                return StreamingResponse(
                    _stream_completions(submitted, rid, name, _usage_wanted(req)), media_type="text/event-stream"
                )
            results = await _answer(request, submitted)
            if results is None:
                return _CLIENT_GONE
        token_text = texts.token
        choices = []
        for i, (prompt, prompt_ids, c) in enumerate(zip(prompts, ids, results, strict=True)):
            echoed = (prompt if isinstance(prompt, str) else model.tokenizer.decode(prompt_ids)) if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = _legacy_logprobs(prompt_ids if req.echo else [], c, len(echoed), token_text)
            choices.append(
                {"index": i, "text": echoed + c.text, "finish_reason": c.finish_reason, "logprobs": logprobs}
            )
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": _usage(results, prompt_tokens),
        }

    @api.post("/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        req = await _parse(request, ChatRequest)
        model = _check_common(base, req)
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("top_logprobs: needs logprobs: true", param="top_logprobs")
        if req.stream and req.logprobs:
            raise InvalidRequest("logprobs are not supported with stream", param="stream")
        if req.stream and req.n > 1:
            raise InvalidRequest("n: more than one choice is not supported with stream on chat", param="n")
        k = (req.top_logprobs or 0) if req.logprobs else None
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        params = _sampling(
            model,
            req,
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
            logprobs=k,
        )
        model.check_prompt_count(req.n, "n")
        chat_ids = await model.encode_chat_async(messages)
        submitted = model.submit_all([(chat_ids, p) for p in _copies(params, req.n)])
        rid, name = f"chatcmpl-{uuid.uuid4().hex}", req.model or model.name
        if req.stream:
            return StreamingResponse(
                _stream_chat(submitted[0], rid, name, _usage_wanted(req)), media_type="text/event-stream"
            )
        results = await _answer(request, submitted)
        if results is None:
            return _CLIENT_GONE
        choices = []
        for j, c in enumerate(results):
            logprobs = None if k is None else {"content": [_chat_logprob(e, k, texts.token) for e in c.logprobs or []]}
            choices.append(
                {
                    "index": j,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": logprobs,
                }
            )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": _usage(results, len(chat_ids)),
        }

    texts = _TokenTexts(base.tokenizer)
    return api


# nginx's "client closed request": nobody reads it, but the access log and the metrics show it.
_CLIENT_GONE = Response(status_code=499)


async def _answer(http: Request, requests: list[GenerationRequest]) -> list[Completion] | None:
    """The completions, or ``None`` when the client disconnected first; either way, once this returns
    or fails, nothing more is generated for ``requests``."""
    answer = asyncio.ensure_future(results_of(requests))
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        return answer.result() if answer in done else None
    finally:
        gone.cancel()
        answer.cancel()
        for r in requests:
            r.cancel()


async def _disconnected(http: Request) -> None:
    # Once the body is read, the server's receive() only returns when the client disconnects.
    while (await http.receive())["type"] != "http.disconnect":
        pass


class _TokenTexts:
    """The text of single tokens, cached (a vocabulary's worth at most)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def token(self, token: int) -> str:
        text = self.cache.get(token)
        if text is None:
            text = self.cache[token] = self.tokenizer.decode([token])
        return text


def _legacy_logprobs(
    prompt_ids: list[int], c: Completion, echoed_chars: int, token_text: Callable[[int], str]
) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` object over the echoed prompt (if any) and the generated tokens."""
    prompt = (c.prompt_logprobs or [None] * len(prompt_ids)) if prompt_ids else []
    generated = c.logprobs or []
    prompt_tokens = [token_text(t) for t in prompt_ids]
    generated_tokens = [token_text(e.token) for e in generated]
    # Offsets into the returned text: the prompt's tokens from 0, the generated ones after the prompt.
    offsets = [*itertools.accumulate(map(len, prompt_tokens[:-1]), initial=0)][: len(prompt_tokens)]
    offsets += [*itertools.accumulate(map(len, generated_tokens[:-1]), initial=echoed_chars)][: len(generated_tokens)]
    entries: list[TokenLogprob | None] = [*prompt, *generated]
    return {
        "tokens": prompt_tokens + generated_tokens,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else {token_text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def _chat_logprob(e: TokenLogprob, k: int, token_text: Callable[[int], str]) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    # ``top`` holds the k best and then, if it is not among them, the chosen token: chat lists k exactly.
    return {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top[:k]]}


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


def _check_common(base: LLMModel, req: _Request) -> LLMModel:
    """The model ``req`` names (404 when none), once its fields are all ones this server honours."""
    model = base.lookup(req.model)
    for name, value in (req.model_extra or {}).items():
        allowed = _NEUTRAL.get(name)
        if allowed is not None and not _neutral(value, allowed):
            shown = " or ".join(json.dumps(v) for v in allowed if v is not None)
            raise InvalidRequest(
                f"{name}: not supported by this server (it would change the answer); leave it out"
                + (f" or send {shown}" if shown else ""),
                param=name,
                code="unsupported_field",
            )
    return model


def _neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):  # True == 1 in Python: a boolean only matches a boolean
        return any(v is value for v in allowed)
    return any(value == v for v in allowed if v is not None and not isinstance(v, bool))


def _sampling(model: LLMModel, req: _Request, max_tokens: int | None, **extra: Any) -> Any:
    return model.sampling(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        seed=req.seed,
        min_tokens=req.min_tokens,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=req.logit_bias,
        **extra,
    )


def _copies(params: SamplingParams, n: int) -> list[SamplingParams]:
    """``n`` requests for the ``n`` choices of one prompt: a seeded sampled request gets seeds ``seed``,
    ``seed + 1`` … so that its choices differ and repeat."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + j) for j in range(n)]


def _usage_wanted(req: _Request) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


def _usage(results: list[Completion], prompt_tokens: int | None = None) -> dict[str, int]:
    """OpenAI's usage; ``prompt_tokens``: counted once per prompt when ``n`` choices share it."""
    prompt = sum(c.prompt_tokens for c in results) if prompt_tokens is None else prompt_tokens
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
        # ... and to the server's log, where the operator looks (with the traceback the client never sees)
        log.exception("streamed generation failed after the response started: %s", err)
        yield _sse({"error": {"message": f"generation failed: {err}", "type": "server_error"}})
    finally:
        for r in requests:
            r.cancelled = True  # no-op once finished; stops the row if the client went away


async def _stream_completions(
    requests: list[GenerationRequest], rid: str, name: str, include_usage: bool
) -> AsyncIterator[str]:
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
        yield _sse(
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        )
        async for item in request.stream():
            if isinstance(item, Completion):
                yield _sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": item.finish_reason}]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage([item])})
            else:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"content": item}, "finish_reason": None}]})

    async for event in _guarded([request], events()):
        yield event


def lora_router(model: LLMModel, guard: Callable[[str | None], None], on: bool) -> APIRouter:
    """vLLM's run-time LoRA routes with vLLM's bodies and answers, behind ``guard`` (the model-repository
    routes' admin token, see :mod:`kubellm.serve.app`; ``on``: listed in the OpenAPI document):
    ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` and ``/v1/unload_lora_adapter {"lora_name"}``."""
    api = APIRouter(tags=["LoRA adapters"])

    async def body(request: Request, fields: tuple[str, ...]) -> dict[str, str]:
        try:
            data = json.loads(await request.body())
        except ValueError:
            raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(data, dict):
            raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
        for field in fields:
            if not isinstance(data.get(field), str) or not data[field]:
                raise InvalidRequest(f"{field}: a non-empty string is required", param=field)
        return data

    async def load(request: Request, authorization: str | None = Header(default=None)) -> PlainTextResponse:
        guard(authorization)
        data = await body(request, ("lora_name", "lora_path"))
        name = data["lora_name"]
        if not _SERVED_NAME.match(name):
            raise InvalidRequest(
                f"lora_name: {name!r} is not a valid name (letters, digits, '-', '_', '.')", param="lora_name"
            )
        if name == model.name or name in model.views:
            raise InvalidRequest(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        try:
            await model.load_adapter(name, data["lora_path"])
        except ServingError as err:
            raise InvalidRequest(str(err), param="lora_path") from None
        log.warning("adapter %s loaded through /v1/load_lora_adapter", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(request: Request, authorization: str | None = Header(default=None)) -> PlainTextResponse:
        guard(authorization)
        name = (await body(request, ("lora_name",)))["lora_name"]
        await model.unload_adapter(name)
        log.warning("adapter %s unloaded through /v1/unload_lora_adapter", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    api.add_api_route("/v1/load_lora_adapter", load, methods=["POST"], include_in_schema=on)
    api.add_api_route("/v1/unload_lora_adapter", unload, methods=["POST"], include_in_schema=on)
    return api
