"""The batching engine: requests generate together and join a running batch at every decode step.

Decoding a small model is overhead-bound: a decode step of 8 rows costs 1.2-1.4× a step of one on these
CPUs, so a batch of 8 gives ~6× the tokens/s of batch 1 (``make bench``, ``bench_serve``). Static
batching (one ``generate`` call per batch) made a request that arrived while a batch was generating wait
for the whole batch: with 8 closed-loop clients the p99 latency was 1.89× that of a request alone. So
the engine runs its own decode loop over one batched KV cache and lets requests join between steps
(continuous batching):

- ``submit_all`` tokenizes nothing and checks nothing (the API layer did both); it puts a request's
  prompts on a **bounded** waiting line all together or not at all, and fails at once with
  :class:`EngineOverloaded` (a 503) when they do not fit, so a refused request leaves nothing queued.
- One worker thread owns the model (torch releases the GIL, so the event loop keeps answering health
  checks and accepting requests meanwhile). Before every decode step it takes waiting requests, up to
  ``max_batch_size`` rows in all, prefills them together (left-padded, one forward pass that also gives
  their first token) and merges their KV cache into the running batch: the narrower of the two caches
  is left-padded with masked columns, so every row's newest token stays in the last column. Rows that
  finish leave the batch at once, and columns that are padding in every remaining row are cut off.
- When nothing is generating, the first request waits up to ``batch_wait_ms`` for others (10 ms by
  default, against the hundreds of ms of a generation): the clients of a batch that just finished come
  back within a few ms, and one prefill for all of them costs about one decode step, where eight
  separate joins would cost eight.
- Positions come from each row's own token count, the attention mask hides the padding, and each row
  picks its token from its own logits: greedy rows take the argmax, sampled rows apply their own
  temperature and top-p (as ``generate`` does, top-k off) and draw from their own ``torch.Generator``,
  so greedy and seeded requests share a batch with anything, and greedy answers are those of the
  request alone. Before a token is picked, a row's own logit bias and repetition, frequency and presence
  penalties change its logits (vLLM's order and formulas, :func:`_process`; checked against plain
  ``generate`` with transformers' processors in ``tests/serve/test_sampling.py``) (checked against plain ``generate``
  in ``tests/serve``; in bf16 a different batch can
  change a near tie).
- Per row: ``max_tokens``, ``stop`` strings, ``min_tokens`` (EOS masked below it) and incremental
  detokenization (a window of the last few tokens, so the cost per step does not grow with the text);
  new text is streamed to the request's event loop after every step. A cancelled request (its client
  went away) leaves the batch at the next step; one still waiting is dropped.
- Log-probabilities (:mod:`kubellm.serve.logprobs`) are only computed for the requests that ask: the
  prompt's in one extra forward pass when the request joins (``max_tokens`` 0 stops there), the
  generated tokens' from the raw logits of each step, before ``min_tokens`` masks EOS.
- ``batching="static"`` admits new requests only when the batch is empty (the behaviour before, kept
  for the benchmark's comparison). A long prompt's prefill stalls the running rows for its duration
  (no chunked prefill).
- An :class:`EngineObserver` hears of every join, first token, token count and finished request, each
  with the adapter it was for (the predictor's Prometheus metrics); the engine itself keeps no history
  beyond :class:`EngineStats`.
- **Many LoRA adapters on one base** (``per_row_adapters``): the model is a peft ``PeftModel`` holding
  every adapter unmerged, and each forward pass names each row's adapter (peft's mixed-batch inference,
  ``adapter_names=[...]``, ``"__base__"`` for the base): rows of different adapters share one batch, one
  KV cache and one pass through the base weights, and each LoRA layer computes every row's product in
  one gathered batched product (:func:`kubellm.serve.adapters.gather_lora`; peft's own path, a product
  per adapter, gave 0.75× the tokens/s of a one-adapter batch with 3 adapters, this one 0.95×). A greedy row answers
  what the adapter alone answers (checked against a predictor serving
  the adapter merged, ``tests/serve/test_adapters.py``). Adding or removing an adapter changes the model,
  so it runs on the worker thread between two steps (:meth:`GenerationEngine.exclusive`), never during
  a forward pass.

``transformers`` ships a continuous-batching path (``generate_batch``, ``ContinuousBatchingManager``);
it is not used: on these CPUs it took 34-50 s for 8 requests of 32 tokens that plain ``generate`` serves
one by one in 2.4 s (paged cache sized to 60 % of RAM, per-step bookkeeping), and it has no per-request
``min_tokens``, seeds, stop strings or top-k log-probabilities.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kubellm.errors import KubellmError
from kubellm.log import get_logger
from kubellm.serve.logprobs import StepLogprobs, TokenLogprob, prompt_logprobs

log = get_logger("kubellm.serve.engine")

Batching = Literal["continuous", "static"]
#: peft's name for "no adapter" in a mixed batch.
BASE_ADAPTER = "__base__"


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
    adapter: str | None = None
    """The LoRA adapter generating this request (engines with ``per_row_adapters``); ``None``: the base."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token generated so far (once per token)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was generated so far."""
    repetition_penalty: float = 1.0
    """transformers' and vLLM's: the logit of every token of the prompt or the output so far is divided by
    it when positive, multiplied when negative (1 disables it)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """``(token id, bias)`` added to those logits at every step (OpenAI's ``logit_bias``)."""

    @property
    def processed(self) -> bool:
        """Whether the logits are changed before a token is picked (penalties or biases)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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

    Called from the worker thread. ``adapter`` is the request's adapter (``None``: the base model).
    """

    def batch(self, size: int) -> None:
        """Requests joined: ``size`` requests now generate together."""

    def first_token(self, seconds: float, adapter: str | None) -> None:
        """A request got its first token ``seconds`` after it was submitted."""

    def tokens(self, prompt: int, generated: int, adapter: str | None) -> None:
        """Prompt tokens of requests that joined, or tokens generated by a step."""

    def finished(self, seconds: float, adapter: str | None) -> None:
        """A request finished (its last token, a stop, or nothing to generate) ``seconds`` after it was
        submitted."""


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
    """Joins: times waiting requests were taken into the batch."""
    requests: int = 0
    generated_tokens: int = 0
    max_batch: int = 0
    """Most requests generating together."""
    busy_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    """Requests taken in by each join."""


class GenerationEngine:
    """Continuous batching of concurrent requests on one worker thread (see the module doc)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_wait_ms: float = 10.0,
        batching: Batching = "continuous",
        observer: EngineObserver | None = None,
        per_row_adapters: bool = False,
    ) -> None:
        self.model = model
        self.per_row_adapters = per_row_adapters
        """Each forward pass names each row's LoRA adapter (``model`` is a peft model; see the module doc)."""
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.batching = batching
        self.stats = EngineStats()
        self.observer = observer or EngineObserver()
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = _pad_id(tokenizer, self.eos_ids)
        self._batch = _Batch(self)
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._control: collections.deque[tuple[Callable[[], Any], asyncio.Future]] = collections.deque()

    # --- lifecycle and submission (on the serving event loop) ---

    async def start(self) -> None:
        """Start the worker thread (again, after :meth:`stop` or a worker that died)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="kubellm-generate", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop taking requests; waiting ones fail with :class:`EngineStopped`; running ones finish."""
        if self._thread is None:
            return
        with self._wake:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._wake.notify_all()
        for request in dropped:
            request._emit("error", EngineStopped("the server is shutting down"))
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._run_control()  # changes asked for while it stopped: nothing generates now, run them here

    async def exclusive(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run while no forward pass is (on the worker thread between two steps, or here when the
        worker is not running); its result or its exception. For changes to the model (adapters)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._wake:
            running = self._thread is not None and self._thread.is_alive()
            if running:
                self._control.append((fn, future))
                self._wake.notify()
        if not running:
            return await asyncio.to_thread(fn)
        return await future

    def _run_control(self) -> None:
        while True:
            with self._wake:
                if not self._control:
                    return
                fn, future = self._control.popleft()
            try:
                result, error = fn(), None
            except Exception as err:  # the caller gets it; the engine goes on
                result, error = None, err
            loop = future.get_loop()
            if error is None:
                loop.call_soon_threadsafe(_settle, future, result, None)
            else:
                loop.call_soon_threadsafe(_settle, future, None, error)

    @property
    def accepting(self) -> bool:
        """Whether a submitted request will be generated: the worker runs and is not stopping. Readiness
        (``/v2/health/ready``) is this: a dead worker used to leave the server "ready" while every
        request waited forever."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping

    @property
    def queued(self) -> int:
        """Requests waiting to join the batch."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests generating now."""
        return len(self._batch.rows)

    def load_by_adapter(self) -> dict[str | None, tuple[int, int]]:
        """``adapter → (running, waiting)`` requests now (``None``: the base); for the metrics."""
        with self._wake:
            waiting = [r.params.adapter for r in self._waiting if not r.cancelled]
        running = [row.request.params.adapter for row in list(self._batch.rows)]
        counts: dict[str | None, tuple[int, int]] = {}
        for adapter in {*waiting, *running}:
            counts[adapter] = (running.count(adapter), waiting.count(adapter))
        return counts

    def cancel_adapter(self, adapter: str) -> None:
        """Cancel every request of ``adapter`` (they leave at the next step)."""
        with self._wake:
            waiting = list(self._waiting)
        for request in [*waiting, *(row.request for row in list(self._batch.rows))]:
            if request.params.adapter == adapter:
                request.cancel()

    def uses_adapter(self, adapter: str) -> bool:
        """Whether a request of ``adapter`` waits or generates now."""
        return adapter in self.load_by_adapter()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationRequest:
        """Queue a request (call on the serving loop). Raises :class:`EngineOverloaded` when full."""
        return self.submit_all([(prompt_ids, params)])[0]

    def submit_all(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[GenerationRequest]:
        """Queue every job or none (call on the serving loop): :class:`EngineOverloaded` when they do not
        all fit. The check and the appends hold the lock, so nothing else takes the room meanwhile."""
        loop = asyncio.get_running_loop()
        requests = [GenerationRequest(list(ids), params, loop) for ids, params in jobs]
        with self._wake:
            if not self.accepting:
                raise EngineStopped("the generation engine is not running")
            waiting = len(self._waiting)
            free = self.max_queue - waiting
            if len(jobs) > free:
                need = "" if len(jobs) == 1 else f", room for {free} of this request's {len(jobs)} prompts"
                raise EngineOverloaded(f"server busy: {waiting} requests already waiting{need}; retry later")
            self._waiting.extend(requests)
            self._wake.notify()
        return requests

    # --- the worker thread ---

    def _work(self) -> None:
        try:
            self._loop()
        except BaseException as err:
            # Not a failed step (those fail their requests and the loop goes on): the loop itself broke.
            # Nothing will generate any more, so whatever waits or runs fails now and readiness drops.
            log.exception("the generation engine stopped")
            with self._wake:
                self._stopping = True
                pending = [*self._waiting, *(row.request for row in self._batch.rows)]
                self._waiting.clear()
            self._batch.fail(pending, EngineStopped(f"the generation engine stopped: {err}"))

    def _loop(self) -> None:
        import torch

        from kubellm.models.precision import autocast

        while (joining := self._wait()) is not None:
            self._run_control()
            # One autocast context per busy period: autocast keeps the bf16 copies of the weights it
            # casts until its context ends (half the fp32 weights' memory), and casting them again at
            # every step made a batch-1 decode step 20-40 % slower (plain generate holds one context for
            # the whole call); the copies are freed when the engine goes idle.
            with torch.inference_mode(), autocast(self.precision, self.device):
                while joining or self._batch.rows:
                    t0 = time.perf_counter()
                    try:
                        if joining:
                            self._batch.admit(joining)
                        if self._batch.rows:
                            self._batch.step()
                    except Exception as err:  # a failed step fails its requests, never the server
                        log.exception("generation failed for %d requests", len(self._batch.rows) + len(joining))
                        self._batch.fail([*joining, *(row.request for row in self._batch.rows)], err)
                    self._batch.outbox.send()
                    self.stats.busy_s += time.perf_counter() - t0
                    self._run_control()
                    joining = self._joining()

    def _wait(self) -> list[GenerationRequest] | None:
        """Sleep until a request comes, then give its fellows ``batch_wait_ms`` to come too; ``None`` when
        the engine stops."""
        with self._wake:
            while not self._waiting and not self._stopping:
                if self._control:
                    return []
                self._wake.wait()
            deadline = time.monotonic() + self.batch_wait_s
            while (
                len(self._waiting) < self.max_batch_size
                and not self._stopping
                and (left := deadline - time.monotonic()) > 0
            ):
                self._wake.wait(left)
            if self._stopping:
                return None
            return self._pop(self.max_batch_size)

    def _joining(self) -> list[GenerationRequest]:
        """Requests that join the running batch before its next step (none while static batching runs)."""
        if self._batch.rows and self.batching == "static":
            return []
        with self._wake:
            return self._pop(self.max_batch_size - len(self._batch.rows))

    def _pop(self, room: int) -> list[GenerationRequest]:
        taken: list[GenerationRequest] = []
        while self._waiting and len(taken) < room:
            request = self._waiting.popleft()
            if not request.cancelled:
                taken.append(request)
        return taken


class _Batch:
    """The running rows and their KV cache, left-padded to one width (worker thread only)."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self.rows: list[_Row] = []
        self.cache: Any = None
        """A ``DynamicCache`` of ``len(rows)`` rows."""
        self.mask: Any = None
        """``rows × columns`` attention mask of the cache: 0 for padding."""
        self.positions: Any = None
        """Position of each row's next token."""
        self.outbox = _Outbox()

    def admit(self, requests: list[GenerationRequest]) -> None:
        """Score prompts that asked for it, then prefill the rest together and merge them into the batch."""
        engine = self.engine
        engine.stats.batches += 1
        engine.stats.requests += len(requests)
        engine.stats.batch_sizes.append(len(requests))
        for adapter, prompt_tokens in _per_adapter((r.params.adapter, len(r.prompt_ids)) for r in requests):
            engine.observer.tokens(prompt_tokens, 0, adapter)
        scored = [r for r in requests if r.params.prompt_logprobs is not None]
        prompt_lps: dict[int, list[TokenLogprob | None]] = {}
        if scored:
            values = prompt_logprobs(
                engine.model,
                [r.prompt_ids for r in scored],
                [r.params.prompt_logprobs or 0 for r in scored],
                device=engine.device,
                precision=engine.precision,
                adapter_names=self._adapter_names(scored),
            )
            prompt_lps = {r.uid: v for r, v in zip(scored, values, strict=True)}
        rows = []
        for r in requests:
            if r.params.max_tokens > 0:
                rows.append(_Row(r, self.outbox, prompt_lps.get(r.uid), engine.device))
            else:
                r._emit("done", Completion("", "length", len(r.prompt_ids), 0, prompt_logprobs=prompt_lps.get(r.uid)))
                engine.observer.finished(time.perf_counter() - r.submitted, r.params.adapter)
        if not rows:
            return
        engine.stats.max_batch = max(engine.stats.max_batch, len(self.rows) + len(rows))
        engine.observer.batch(len(self.rows) + len(rows))
        import torch
        from transformers import DynamicCache

        width = max(len(row.request.prompt_ids) for row in rows)
        # Left padding: every row's last prompt token sits in the last column, where generation goes on.
        ids = torch.full((len(rows), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = row.request.prompt_ids
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(engine.device), mask.to(engine.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, [row.request for row in rows])
        self._merge(rows, cache, mask, positions[:, -1] + 1)
        self._advance(logits, rows)

    def step(self) -> None:
        """One decode step of every row: feed its last token, pick the next."""
        import torch

        last = torch.tensor([[row.last] for row in self.rows], dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits = self._forward(last, self.mask, self.positions[:, None], self.cache, [row.request for row in self.rows])
        self.positions = self.positions + 1
        self._advance(logits, self.rows)

    def fail(self, requests: list[GenerationRequest], err: Exception) -> None:
        self.outbox.send()  # what rows finished before the failure
        for request in requests:
            request._emit("error", err)
        self.rows, self.cache, self.mask, self.positions = [], None, None, None

    def _adapter_names(self, requests: list[GenerationRequest]) -> list[str] | None:
        """peft's per-row adapter names of ``requests`` (``None`` for an engine of one model)."""
        if not self.engine.per_row_adapters:
            return None
        return [r.params.adapter or BASE_ADAPTER for r in requests]

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any, requests: list[GenerationRequest]) -> Any:

        from kubellm.models.precision import autocast

        names = self._adapter_names(requests)
        extra = {} if names is None else {"adapter_names": names}
        with autocast(self.engine.precision, self.engine.device):
            out = self.engine.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        return out.logits[:, -1, :].float()

    def _merge(self, rows: list[_Row], cache: Any, mask: Any, positions: Any) -> None:
        """Append ``rows`` (with their prefilled ``cache``) to the batch, left-padding the narrower side."""
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask, self.positions = rows, cache, mask, positions
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.rows = self.rows + rows

    def _advance(self, logits: Any, rows: list[_Row]) -> None:
        """Pick each row's next token, hand it to the row, and drop the rows that are done."""
        engine = self.engine
        tokens, logprobs = _pick(logits, rows, sorted(engine.eos_ids))
        added = [
            (row.request.params.adapter, row.advance(token, lp, engine))
            for row, token, lp in zip(rows, tokens, logprobs, strict=True)
        ]
        engine.stats.generated_tokens += sum(n for _, n in added)
        for adapter, generated in _per_adapter(added):
            if generated:
                engine.observer.tokens(0, generated, adapter)
        if any(row.done for row in self.rows):
            self._drop_done()

    def _drop_done(self) -> None:
        import torch

        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if not keep:
            self.rows, self.cache, self.mask, self.positions = [], None, None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions = self.mask[index], self.positions[index]
        # Columns that are padding in every remaining row (the left part of a long row that left).
        cut = int(self.mask.any(dim=0).int().argmax())
        if cut:
            self.mask = self.mask[:, cut:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]


class _Outbox:
    """What a step has for the requests' event loops, sent with one wake-up per loop and step.

    Waking the serving loop once per token and request (8 rows: 8 wake-ups per step) cost the worker
    thread the GIL that often; the events of a request keep their order.
    """

    def __init__(self) -> None:
        self.events: list[tuple[GenerationRequest, str, Any]] = []

    def add(self, request: GenerationRequest, kind: str, value: Any) -> None:
        self.events.append((request, kind, value))

    def send(self) -> None:
        if not self.events:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationRequest, str, Any]]] = {}
        for event in self.events:
            by_loop.setdefault(event[0].loop, []).append(event)
        self.events = []
        for loop, events in by_loop.items():
            loop.call_soon_threadsafe(_deliver, events)


def _per_adapter(counts: Any) -> list[tuple[str | None, int]]:
    """``(adapter, n)`` pairs summed per adapter, in first-seen order."""
    total: dict[str | None, int] = {}
    for adapter, n in counts:
        total[adapter] = total.get(adapter, 0) + n
    return list(total.items())


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver(events: list[tuple[GenerationRequest, str, Any]]) -> None:
    for request, kind, value in events:
        request._events.put_nowait((kind, value))


def _pad_left(tensor: Any, width: int, dim: int) -> Any:
    """``tensor`` with zero columns prepended along ``dim`` up to ``width`` (masked padding)."""
    import torch

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _pick(logits: Any, rows: list[_Row], eos: list[int]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Each row's next token from its ``logits`` row, and its log-probability entry if it asked for one."""
    import torch

    wanted = [row.request.params.logprobs for row in rows]
    step_lps = StepLogprobs(wanted) if any(k is not None for k in wanted) else None
    if step_lps is not None:
        step_lps(None, logits)  # the raw logits, before min_tokens masks EOS
    for i, row in enumerate(rows):
        if row.request.params.processed:
            _process(logits, i, row)
    short = [i for i, row in enumerate(rows) if len(row.tokens) < row.request.params.min_tokens]
    if short and eos:
        logits[torch.tensor(short, device=logits.device)[:, None], torch.tensor(eos, device=logits.device)] = float(
            "-inf"
        )
    tokens = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        if not row.request.params.greedy:
            tokens[i] = _sample(logits[i], row.request.params, row.generator)
    chosen = tokens.tolist()
    lps = [
        step_lps.take(i, t) if step_lps is not None and wanted[i] is not None else None for i, t in enumerate(chosen)
    ]
    return chosen, lps


def _process(logits: Any, i: int, row: _Row) -> None:
    """Row ``i``'s penalties and biases applied to its logits in place, in vLLM's order: the logit bias,
    then the repetition penalty (over prompt and output), then the frequency and presence penalties (over
    the output)."""
    import torch

    params, device = row.request.params, logits.device
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=device)
        logits[i, ids] += torch.tensor([b for _, b in params.logit_bias], device=device, dtype=logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*row.request.prompt_ids, *row.tokens}), device=device)
        values = logits[i, seen]
        logits[i, seen] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    if row.tokens and (params.frequency_penalty or params.presence_penalty):
        ids, counts = torch.unique(torch.tensor(row.tokens, device=device), return_counts=True)
        logits[i, ids] -= params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty


def _sample(scores: Any, params: SamplingParams, generator: Any) -> Any:
    """One token drawn as ``generate`` draws it: temperature, then top-p (nucleus), then softmax."""
    import torch

    scores = scores / params.temperature
    if params.top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the least likely tokens whose mass stays within 1 - top_p.
        ordered, order = torch.sort(scores)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - params.top_p
        drop[-1] = False
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[0]


class _Row:
    """One request in the batch: its tokens, its text so far, and its stream."""

    __slots__ = (
        "request",
        "outbox",
        "prompt_logprobs",
        "generator",
        "tokens",
        "last",
        "text",
        "sent",
        "prefix_offset",
        "read_offset",
        "done",
        "steps",
        "logprobs",
    )

    def __init__(
        self, request: GenerationRequest, outbox: _Outbox, prompt_lps: list[TokenLogprob | None] | None, device: str
    ) -> None:
        import torch

        self.request = request
        self.outbox = outbox
        self.prompt_logprobs = prompt_lps
        self.generator = None
        if not request.params.greedy:
            self.generator = torch.Generator(device=device)
            if request.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(request.params.seed)
        self.tokens: list[int] = []
        self.last = 0
        """The token fed at the next step (EOS never is: the row is done)."""
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

    def advance(self, token: int, logprob: TokenLogprob | None, engine: GenerationEngine) -> int:
        """Take the row's next token: stream new text, apply its limits. Returns the tokens it added (0/1)."""
        request = self.request
        if request.cancelled:
            self.done = True
            self.outbox.add(request, "error", EngineStopped("request cancelled"))
            return 0
        if self.steps == 0:
            engine.observer.first_token(time.perf_counter() - request.submitted, request.params.adapter)
        self.steps += 1
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)  # EOS too, as vLLM reports it
        if token in engine.eos_ids:
            self._finish("stop", engine)
            return 0
        self.tokens.append(token)
        self.last = token
        self._decode(engine.tokenizer)
        stop = request.params.stop
        if stop:
            cut = _find_stop(self.text, stop, start=max(0, self.sent - max(map(len, stop))))
            if cut is not None:
                self.text = self.text[:cut]
                self._finish("stop", engine, flush=False)
                return 1
        if len(self.tokens) >= request.params.max_tokens:
            self._finish("length", engine)
            return 1
        safe = len(self.text) - _held_back(self.text, stop)
        if safe > self.sent:
            self.outbox.add(request, "delta", self.text[self.sent : safe])
            self.sent = safe
        return 1

    def _decode(self, tokenizer: Any) -> None:
        before = tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = tokenizer.decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)

    def _finish(self, reason: str, engine: GenerationEngine, flush: bool = True) -> None:
        self.done = True
        tokenizer = engine.tokenizer
        if flush:
            # Whatever the window held back (an incomplete character at the very end) comes out now.
            full = tokenizer.decode(self.tokens, skip_special_tokens=True)
            if full.startswith(self.text):
                self.text = full
        request = self.request
        if len(self.text) > self.sent:
            self.outbox.add(request, "delta", self.text[self.sent :])
            self.sent = len(self.text)
        done = Completion(
            self.text, reason, len(request.prompt_ids), len(self.tokens), self.logprobs, self.prompt_logprobs
        )
        self.outbox.add(request, "done", done)
        engine.observer.finished(time.perf_counter() - request.submitted, request.params.adapter)


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
