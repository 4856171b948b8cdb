"""The batching engine: concurrent requests generated together, one batch at a time, off the event loop.

Decoding a small model is overhead-bound: a static batch of 8 gives ~5× the tokens/s of batch 1 on these
CPUs (measured with `make bench`, `bench_serve`). So requests are not generated one by one:

- ``submit_all`` tokenizes nothing and checks nothing (the API layer did both); it puts a request's
  prompts on a **bounded** ``asyncio.Queue`` all together or not at all, and fails at once with
  :class:`EngineOverloaded` (a 503) when they do not fit, so a refused request leaves nothing queued.
- One collector task takes the first waiting request and up to ``max_batch_size - 1`` more, waiting up
  to ``batch_wait_ms`` for them unless the batch is full. The clients of a finished batch send their
  next request within a few ms, and waiting for them keeps the batch full: without the wait, 8
  closed-loop clients fell apart into batches of 1 + 7 and served about half the tokens/s of a static
  batch of 8. A lone client pays the wait once per request (10 ms by default, against the hundreds of
  ms of a generation).
- The batch runs on one dedicated worker thread (torch releases the GIL, so the event loop keeps
  answering health checks and accepting requests meanwhile). Prompts are left-padded into one
  ``generate`` call per sampling group: greedy requests share a call whatever their lengths and stop
  strings; sampled requests share one when temperature and top_p agree; a seeded sampled request runs
  alone so that the same seed gives the same text.
- Per-row limits live in a stopping criterion that ``generate`` calls after every step: it records each
  row's new token, decodes it incrementally (a window of the last few tokens, so the cost per step does
  not grow with the text), applies the row's ``max_tokens`` and ``stop`` strings, and streams the new
  text to the row's request on the event loop. A row that is done stops counting; the call ends when
  every row is done. ``min_tokens`` (to fix generation lengths in benchmarks) masks EOS per row.
- Log-probabilities (:mod:`kubellm.serve.logprobs`) are only computed for the requests that ask: the
  prompt's in one extra forward pass before generating (``max_tokens`` 0 stops there), the generated
  tokens' by a logits processor that sees the raw logits of each step.
- An :class:`EngineObserver` hears of every batch, first token and token count (the predictor's
  Prometheus metrics); the engine itself keeps no history beyond :class:`EngineStats`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kubellm.errors import KubellmError
from kubellm.log import get_logger
from kubellm.serve.logprobs import StepLogprobs, TokenLogprob, prompt_logprobs

log = get_logger("kubellm.serve.engine")


class EngineOverloaded(KubellmError):
    """The request queue is full (the API answers 503 and the client may retry)."""


class EngineStopped(KubellmError):
    """The engine is shutting down or was never started."""


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of generation."""

    max_tokens: int
    """Most tokens to generate (0: only the prompt's log-probabilities are computed)."""
    temperature: float = 0.0
    """0 is greedy; otherwise softmax temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 disables it)."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings (not included in the text)."""
    seed: int | None = None
    """Seed of a sampled request (ignored when greedy)."""
    min_tokens: int = 0
    """EOS is suppressed until this many tokens were generated."""
    logprobs: int | None = None
    """Log-probability of each generated token with this many alternatives; ``None``: none."""
    prompt_logprobs: int | None = None
    """Log-probability of each prompt token with this many alternatives; ``None``: none."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def group_key(self, uid: int) -> tuple:
        """Requests with equal keys can share one ``generate`` call."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", uid)  # alone: the same seed must give the same text
        return ("sample", self.temperature, self.top_p)


@dataclass
class Completion:
    """A finished generation."""

    text: str
    finish_reason: str
    """``stop`` (EOS or a stop string) or ``length`` (``max_tokens`` reached)."""
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    """One entry per generated token, EOS included (when asked for)."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """One entry per prompt token, ``None`` for the first (when asked for)."""


class EngineObserver:
    """What the engine reports as it works (the predictor's metrics); this base ignores it all.

    Called from the worker thread.
    """

    def batch(self, size: int) -> None:
        """A batch of ``size`` requests starts."""

    def first_token(self, seconds: float) -> None:
        """A request got its first token ``seconds`` after it was submitted."""

    def tokens(self, prompt: int, generated: int) -> None:
        """A generation group ended: its prompts' tokens and the tokens it generated."""


_uids = itertools.count()


@dataclass(eq=False)
class GenerationRequest:
    """One submitted request: iterate :meth:`stream` for text as it is generated, or await :meth:`result`."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    uid: int = field(default_factory=lambda: next(_uids))
    cancelled: bool = False
    """Set when the client went away or the request failed: the row stops at the next step, a request
    still queued is dropped."""
    submitted: float = field(default_factory=time.perf_counter)
    _events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def cancel(self) -> None:
        """Stop generating for this request (a no-op once it has finished)."""
        self.cancelled = True

    # Called from the worker thread: hand events to the request's own event loop.
    def _emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

    async def stream(self) -> AsyncIterator[str | Completion]:
        """Text deltas as they are generated, then the :class:`Completion` as the last item.

        A consumer that stops early (the client went away: its handler is cancelled) cancels the
        request, so its row stops generating at the next step instead of running to ``max_tokens``.
        """
        try:
            while True:
                kind, value = await self._events.get()
                if kind == "error":
                    raise value
                yield value
                if kind == "done":
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled = True
            raise

    async def result(self) -> Completion:
        """Wait for the whole completion."""
        async for item in self.stream():
            if isinstance(item, Completion):
                return item
        raise EngineStopped("generation ended without a result")  # pragma: no cover - stream always ends so


@dataclass
class EngineStats:
    """Counters for logs, tests and the benchmark."""

    batches: int = 0
    requests: int = 0
    generated_tokens: int = 0
    max_batch: int = 0
    busy_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)


class GenerationEngine:
    """Batches concurrent requests into ``generate`` calls on one worker thread (see the module doc)."""

    def __init__(self, model: Any, tokenizer: Any, *, device: str = "cpu", precision: str = "fp32",
                 max_batch_size: int = 8, max_queue: int = 64, batch_wait_ms: float = 10.0,
                 observer: EngineObserver | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.stats = EngineStats()
        self.observer = observer or EngineObserver()
        self.running = 0
        """Requests of the batch being generated now."""
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = _pad_id(tokenizer, self.eos_ids)
        self._queue: asyncio.Queue[GenerationRequest] | None = None
        self._collector: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # --- lifecycle (on the serving event loop) ---

    async def start(self) -> None:
        """Start the collector on the running loop and the worker thread."""
        if self._collector is not None:
            return
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubellm-generate")
        self._collector = asyncio.get_running_loop().create_task(self._collect(), name="kubellm-batcher")

    async def stop(self) -> None:
        """Stop collecting; waiting requests fail with :class:`EngineStopped`; the running batch finishes."""
        if self._collector is None:
            return
        self._collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._collector
        self._collector = None
        assert self._queue is not None and self._executor is not None
        while not self._queue.empty():
            self._queue.get_nowait()._emit("error", EngineStopped("the server is shutting down"))
        self._executor.shutdown(wait=True)
        self._executor = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationRequest:
        """Queue a request (call on the serving loop). Raises :class:`EngineOverloaded` when full."""
        return self.submit_all([(prompt_ids, params)])[0]

    def submit_all(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[GenerationRequest]:
        """Queue every job or none (call on the serving loop): :class:`EngineOverloaded` when they do not
        all fit. No ``await`` between the check and the puts, so nothing else takes the room meanwhile."""
        if self._queue is None or self._collector is None:
            raise EngineStopped("the generation engine is not running")
        free = self.max_queue - self._queue.qsize()
        if len(jobs) > free:
            need = "" if len(jobs) == 1 else f", room for {free} of this request's {len(jobs)} prompts"
            raise EngineOverloaded(f"server busy: {self._queue.qsize()} requests already waiting{need}; retry later")
        loop = asyncio.get_running_loop()
        requests = [GenerationRequest(list(ids), params, loop) for ids, params in jobs]
        for request in requests:
            self._queue.put_nowait(request)
        return requests

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [r for r in batch if not r.cancelled]
            if not batch:
                continue
            try:
                await loop.run_in_executor(self._executor, self.run_batch, batch)
            except Exception as err:  # a failed batch fails its requests, never the server
                log.exception("generation failed for a batch of %d", len(batch))
                for request in batch:
                    request._emit("error", err)

    # --- generation (on the worker thread) ---

    def run_batch(self, batch: list[GenerationRequest]) -> None:
        """Generate every request of ``batch``: one ``generate`` call per sampling group."""
        t0 = time.perf_counter()
        # Counted before generating: a client may read the stats as soon as its answer arrives.
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        self.stats.batch_sizes.append(len(batch))
        self.observer.batch(len(batch))
        self.running = len(batch)
        groups: dict[tuple, list[GenerationRequest]] = {}
        for request in batch:
            groups.setdefault(request.params.group_key(request.uid), []).append(request)
        try:
            for members in groups.values():
                self._score_and_generate(members)
        finally:
            self.running = 0
        self.stats.busy_s += time.perf_counter() - t0

    def _score_and_generate(self, requests: list[GenerationRequest]) -> None:
        """Prompt log-probabilities for those who asked, then generation for those with ``max_tokens``."""
        scored = [r for r in requests if r.params.prompt_logprobs is not None]
        prompt_lps: dict[int, list[TokenLogprob | None]] = {}
        if scored:
            values = prompt_logprobs(self.model, [r.prompt_ids for r in scored],
                                     [r.params.prompt_logprobs or 0 for r in scored], device=self.device,
                                     precision=self.precision)
            prompt_lps = {r.uid: v for r, v in zip(scored, values, strict=True)}
        generating = []
        for r in requests:
            if r.params.max_tokens > 0:
                generating.append(r)
            else:
                r._emit("done", Completion("", "length", len(r.prompt_ids), 0, prompt_logprobs=prompt_lps.get(r.uid)))
        if generating:
            self._generate(generating, prompt_lps)
        self.observer.tokens(sum(len(r.prompt_ids) for r in requests), 0)

    def _generate(self, requests: list[GenerationRequest],
                  prompt_lps: dict[int, list[TokenLogprob | None]]) -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from kubellm.train.precision import autocast

        params = requests[0].params
        width = max(len(r.prompt_ids) for r in requests)
        # Left padding: every row's last prompt token sits in the last column, where generation starts;
        # the attention mask hides the padding and generate derives position ids from it.
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[row, width - len(r.prompt_ids):] = 1
        wanted = [r.params.logprobs for r in requests]
        step_lps = StepLogprobs(wanted) if any(k is not None for k in wanted) else None
        tracker = _BatchTracker(requests, self.tokenizer, self.eos_ids, step_lps, prompt_lps, self.observer)
        gen_cfg = GenerationConfig(
            max_new_tokens=max(r.params.max_tokens for r in requests),
            do_sample=not params.greedy,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
            **({"temperature": params.temperature, "top_p": params.top_p, "top_k": 0} if not params.greedy else {}),
        )
        # The log-probabilities come first: they are of the raw logits, before min_tokens masks EOS.
        chain = [p for p in (step_lps, tracker.min_tokens_processor() if tracker.needs_min_tokens else None) if p]
        processors = LogitsProcessorList(chain) if chain else None
        if not params.greedy and params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode(), autocast(self.precision, self.device):
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                generation_config=gen_cfg, stopping_criteria=StoppingCriteriaList([tracker]),
                                logits_processor=processors)
        tracker.finish_all()
        self.stats.generated_tokens += tracker.generated
        self.observer.tokens(0, tracker.generated)


class _Row:
    """Per-request state inside one ``generate`` call."""

    __slots__ = ("request", "tokens", "text", "sent", "prefix_offset", "read_offset", "done", "reason", "steps",
                 "logprobs")

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.steps = 0
        self.logprobs: list[TokenLogprob] | None = [] if request.params.logprobs is not None else None
        self.text = ""
        self.sent = 0
        # Incremental detokenization window: text of tokens[prefix_offset:read_offset] is already in
        # `text`; a byte-level BPE token can be half a UTF-8 character, so text is only taken once the
        # window decodes without a trailing U+FFFD.
        self.prefix_offset = 0
        self.read_offset = 0
        self.done = False
        self.reason = ""


class _BatchTracker:
    """A ``StoppingCriteria`` that keeps every row's text, limits and stream (see the module doc)."""

    def __init__(self, requests: list[GenerationRequest], tokenizer: Any, eos_ids: set[int],
                 step_lps: StepLogprobs | None, prompt_lps: dict[int, list[TokenLogprob | None]],
                 observer: EngineObserver) -> None:
        self.rows = [_Row(r) for r in requests]
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.step_lps = step_lps
        self.prompt_lps = prompt_lps
        self.observer = observer
        self.generated = 0
        self.needs_min_tokens = bool(eos_ids) and any(r.params.min_tokens > 0 for r in requests)

    def __call__(self, input_ids: Any, scores: Any = None, **kwargs: Any) -> Any:
        import torch

        last = input_ids[:, -1].tolist()
        for i, (row, token) in enumerate(zip(self.rows, last, strict=True)):
            if not row.done:
                self._step(i, row, token)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def _step(self, i: int, row: _Row, token: int) -> None:
        request = row.request
        if request.cancelled:
            row.done, row.reason = True, "cancelled"
            return
        if row.steps == 0:
            self.observer.first_token(time.perf_counter() - request.submitted)
        row.steps += 1
        if row.logprobs is not None and self.step_lps is not None:
            row.logprobs.append(self.step_lps.take(i, token))  # EOS too, as vLLM reports it
        if token in self.eos_ids:
            self._finish(row, "stop")
            return
        row.tokens.append(token)
        self.generated += 1
        self._decode(row)
        stop = request.params.stop
        if stop:
            cut = _find_stop(row.text, stop, start=max(0, row.sent - max(map(len, stop))))
            if cut is not None:
                row.text = row.text[:cut]
                self._finish(row, "stop", flush=False)
                return
        if len(row.tokens) >= request.params.max_tokens:
            self._finish(row, "length")
            return
        safe = len(row.text) - _held_back(row.text, stop)
        if safe > row.sent:
            request._emit("delta", row.text[row.sent:safe])
            row.sent = safe

    def _decode(self, row: _Row) -> None:
        decode = self.tokenizer.decode
        before = decode(row.tokens[row.prefix_offset:row.read_offset], skip_special_tokens=True)
        after = decode(row.tokens[row.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            row.text += after[len(before):]
            row.prefix_offset = row.read_offset
            row.read_offset = len(row.tokens)

    def _finish(self, row: _Row, reason: str, flush: bool = True) -> None:
        row.done, row.reason = True, reason
        if flush:
            # Whatever the window held back (an incomplete character at the very end) comes out now.
            full = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            if full.startswith(row.text):
                row.text = full
        request = row.request
        if len(row.text) > row.sent:
            request._emit("delta", row.text[row.sent:])
            row.sent = len(row.text)
        request._emit("done", Completion(row.text, reason, len(request.prompt_ids), len(row.tokens), row.logprobs,
                                         self.prompt_lps.get(request.uid)))

    def finish_all(self) -> None:
        """Rows still open when ``generate`` returned hit the call's length limit."""
        for row in self.rows:
            if not row.done:
                self._finish(row, "length")
            elif row.reason == "cancelled":
                row.request._emit("error", EngineStopped("request cancelled"))

    def min_tokens_processor(self) -> _MinTokens:
        return _MinTokens(self.rows, sorted(self.eos_ids))


class _MinTokens:
    """A logits processor masking EOS for the rows still below their ``min_tokens``."""

    def __init__(self, rows: list[_Row], eos: list[int]) -> None:
        self.rows, self.eos = rows, eos

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        for i, row in enumerate(self.rows):
            if not row.done and len(row.tokens) < row.request.params.min_tokens:
                scores[i, self.eos] = float("-inf")
        return scores


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _pad_id(tokenizer: Any, eos_ids: set[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return min(eos_ids) if eos_ids else 0
