"""The predictor: a ``kserve.Model`` that loads a causal LM and generates through the batching engine.

It serves three protocols from one FastAPI app (:mod:`kubellm.serve.app`):

- **KServe V1** ``POST /v1/models/<name>:predict`` with ``{"instances": ["prompt", {"prompt": …,
  "max_tokens": …}], "parameters": {…}}`` → ``{"predictions": ["text", …]}``;
- **Open Inference Protocol V2** ``POST /v2/models/<name>/infer`` with a BYTES input ``text_input`` and
  generation settings in the request ``parameters`` → a BYTES output ``text_output``; health
  ``/v2/health/live|ready``, ``/v2/models/<name>/ready``, metadata ``/v2/models/<name>``;
- an **OpenAI-compatible API** under ``/openai/v1`` (:mod:`kubellm.serve.openai_api`).

Why KServe's own V1/V2 routes: kserve 0.21 exposes ``register_v1_endpoints``/``register_v2_endpoints``
over a ``DataPlane`` and a ``ModelRepository``, which is exactly what its ``ModelServer`` mounts. Mounting
them on our own FastAPI app with this model registered gives the protocols byte-for-byte as KServe
serves them (request decoding, CloudEvents, error codes, V2 metadata) without reimplementing them,
while avoiding ``ModelServer`` itself: it binds 0.0.0.0, starts a gRPC server and installs signal
handlers. We run the app with uvicorn on ``serve.host`` (127.0.0.1 locally, 0.0.0.0 in the pod). KServe's
OpenAI routes need vllm (never installed here), so those are our own.

One request cannot stall or bloat the server: bodies over ``serve.max_request_bytes`` are refused before
they are read (:mod:`kubellm.serve.app`); a prompt is refused by its character count before it is
tokenized when it cannot fit (no token covers more characters than twice the tokenizer's longest
vocabulary entry, see :meth:`LLMModel._check_chars`); tokenization runs on a worker thread, never on the
event loop that answers health probes; a request with more prompts than ``serve.max_queue`` is a 400 (it
could never be queued) and one that fails or loses its client cancels every prompt it queued.

Importing kserve parses ``sys.argv`` (``kserve.model_server`` runs ``parse_known_args`` at import, with
prefix matching: our ``--config`` would be read as its boolean ``--configure_logging`` and abort).
:func:`import_kserve` imports it with a bare ``argv``; this module is only imported by ``kubellm serve``.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubellm.errors import ServingError
from kubellm.fsutil import user_path
from kubellm.log import get_logger
from kubellm.models.causal_lm import is_adapter_dir
from kubellm.serve.adapters import AdapterInfo, gather_lora
from kubellm.serve.engine import (
    Completion,
    EngineObserver,
    GenerationEngine,
    GenerationRequest,
    SamplingParams,
)

if TYPE_CHECKING:
    from kubellm.config.serve import ServeConfig
    from kubellm.config.tracking import TrackingConfig

log = get_logger("kubellm.serve")

#: Where KServe's storage initializer puts the model in a predictor pod.
KSERVE_MODEL_DIR = "/mnt/models"
# Files that mark a loadable directory: a full model or a LoRA adapter.
_MODEL_MARKERS = ("config.json", "adapter_config.json")


def import_kserve() -> Any:
    """``import kserve`` without letting its import-time argument parser see our command line."""
    if "kserve" in sys.modules:
        return sys.modules["kserve"]
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        import kserve
    finally:
        sys.argv = argv
    return kserve


kserve = import_kserve()


class InvalidRequest(ServingError):
    """A request the client must fix: answered with ``status`` (4xx) and an OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers


def resolve_model(ref: str, *, tracking: TrackingConfig | None = None, workdir: str | Path = ".kubellm") -> str:
    """A local directory (or Hub id) to load for ``ref``.

    ``models:/name@alias`` is downloaded through the registry; a directory is searched two levels deep
    for the model (KServe's storage initializer and MLflow artifacts may nest it, e.g.
    ``/mnt/models/model``); anything else that looks like ``owner/name`` is passed on as a Hub id.
    """
    if ref.startswith("models:/"):
        from kubellm.config.tracking import TrackingConfig
        from kubellm.tracking.registry import resolve_model_uri

        return str(resolve_model_uri(tracking or TrackingConfig(), workdir, ref))
    path = user_path(ref)
    if path.is_dir():
        return str(find_model_dir(path))
    if path.exists():
        raise ServingError(f"{ref}: expected a model directory, found a file")
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return ref  # a Hub id: load_causal_lm says clearly when the network does not allow it
    raise ServingError(f"{ref}: no such model directory (expected a directory, models:/name@alias or a Hub id)")


def find_model_dir(root: Path) -> Path:
    """``root`` or the one directory below it (two levels at most) holding a model or an adapter."""
    if any((root / m).is_file() for m in _MODEL_MARKERS):
        return root
    found = sorted({p.parent for m in _MODEL_MARKERS for pattern in (f"*/{m}", f"*/*/{m}") for p in root.glob(pattern)})
    if len(found) == 1:
        return found[0]
    if not found:
        listing = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "empty"
        raise ServingError(
            f"{root}: no model in this directory (no config.json or adapter_config.json; found: {listing})"
        )
    raise ServingError(
        f"{root}: several models below this directory ({', '.join(map(str, found[:4]))}); point at one of them"
    )


class LLMModel(kserve.Model):
    """A causal LM behind the batching engine, registered with KServe's data plane under ``cfg.model_name``.

    ``source`` is a directory, ``models:/name@alias`` or a Hub id (:func:`resolve_model`); a LoRA adapter
    given alone is merged into its base (``base_model``, else the base the adapter records) at load time,
    so serving costs what the base model costs.

    With ``adapters`` (``serve.adapters`` and ``extra_adapters``: name → URI) ``source`` must be the base
    model: it is loaded once and each adapter beside it, unmerged (:mod:`kubellm.serve.adapters`). Each
    adapter is served under its own name by a *view* (:meth:`view`): an ``LLMModel`` sharing this one's
    engine and tokenizer whose requests name their adapter; :meth:`lookup` finds the model a request
    names, :meth:`load_adapter` and :meth:`unload_adapter` change the set at run time.
    """

    def __init__(
        self,
        cfg: ServeConfig,
        source: str,
        *,
        base_model: str | None = None,
        tracking: TrackingConfig | None = None,
        workdir: str | Path = ".kubellm",
        extra_adapters: dict[str, str] | None = None,
    ) -> None:
        super().__init__(cfg.model_name)
        self.cfg = cfg
        self.source = source
        self.base_model = base_model
        self.tracking = tracking
        self.workdir = workdir
        self.engine: GenerationEngine | None = None
        self.tokenizer: Any = None
        self.description = source
        self.max_prompt_chars = 0
        """Longest prompt text that might fit ``max_prompt_tokens`` (set by :meth:`load`)."""
        self.adapter: AdapterInfo | None = None
        """The LoRA adapter this name serves (a view); ``None``: the model itself."""
        self.base: LLMModel = self
        """The model whose engine generates for this name (itself, unless a view)."""
        self.adapter_sources = {**cfg.adapters, **(extra_adapters or {})}
        self.serves_base = False
        """The loaded model is a full model (not an adapter merged into its base): adapters may join it."""
        self.listeners: list[Callable[[str, LLMModel | None], None]] = []
        """Called with ``(name, view)`` when an adapter is served, ``(name, None)`` when it is not any more."""
        self._views: dict[str, LLMModel] = {}
        self._pending: set[str] = set()
        self._plain: Any = None
        self._base_path: str | None = None
        self._fingerprint: str | None = None

    # --- loading ---

    def load(self, observer: EngineObserver | None = None) -> bool:
        """Resolve and load the model, pick device and precision, and build the engine."""
        import torch

        from kubellm.models.causal_lm import load_causal_lm
        from kubellm.models.precision import resolve_device, resolve_precision

        path = resolve_model(self.source, tracking=self.tracking, workdir=self.workdir)
        self.serves_base = not (Path(path).is_dir() and is_adapter_dir(path))
        if self.adapter_sources and not self.serves_base:
            raise ServingError(
                f"serve.model: {self.source} is a LoRA adapter; with serve.adapters the model must be "
                "the base model (name this adapter under serve.adapters too)"
            )
        device = resolve_device(self.cfg.device)
        precision = resolve_precision(self.cfg.precision, device)
        # On a GPU the weights themselves go to bf16 (half the memory); on a CPU they stay fp32 and
        # generate runs under bf16 autocast, which is where the 1.5-1.75x of native bf16 comes from.
        on_gpu = device.startswith("cuda")
        dtype = torch.bfloat16 if on_gpu and precision == "bf16" else None
        loaded = load_causal_lm(path, base_model=self.base_model, device=device, dtype=dtype, merge_adapter=True)
        self.tokenizer = loaded.tokenizer
        self.description = loaded.source
        # Composed characters (NFC/NFKC, e.g. "e" + U+0301 -> "é") let a token cover up to about twice
        # its vocabulary entry's length: the factor 2 keeps the cheap check from refusing what fits.
        longest = max((len(t) for t in loaded.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = 2 * longest * self.cfg.max_prompt_tokens
        self.engine = GenerationEngine(
            loaded.model,
            loaded.tokenizer,
            device=device,
            precision="fp32" if on_gpu else precision,
            max_batch_size=self.cfg.max_batch_size,
            max_queue=self.cfg.max_queue,
            batch_wait_ms=self.cfg.batch_wait_ms,
            batching=self.cfg.batching,
            observer=observer,
        )
        self._plain, self._base_path = loaded.model, path
        log.info("loaded %s on %s (%s)", loaded.source, device, "bf16" if precision == "bf16" else "fp32")
        for name, uri in self.adapter_sources.items():
            self._attach(self._prepare_adapter(name, uri))
        self.ready = True
        return True

    # --- adapters on the base ---

    def view(self, info: AdapterInfo) -> LLMModel:
        """The model served under ``info.name``: this one's engine and tokenizer, requests on the adapter."""
        view = LLMModel(self.cfg, info.source, tracking=self.tracking, workdir=self.workdir)
        view.name = info.name
        view.adapter, view.base, view.description = info, self, f"{self.description} + adapter {info.path}"
        view.engine, view.tokenizer, view.max_prompt_chars = self.engine, self.tokenizer, self.max_prompt_chars
        view.ready = True
        return view

    @property
    def views(self) -> dict[str, LLMModel]:
        """The adapters served now, by name (of the base; a view has none)."""
        return dict(self.base._views)

    def lookup(self, name: str | None) -> LLMModel:
        """The model a request names (``None``: the base); an unknown name is a 404."""
        base = self.base
        if name is None or name == base.name:
            return base
        view = base._views.get(name)
        if view is None:
            served = ", ".join([base.name, *base._views])
            raise InvalidRequest(
                f"The model '{name}' does not exist (this server serves: {served})",
                status=404,
                param="model",
                code="model_not_found",
            )
        return view

    def _prepare_adapter(self, name: str, uri: str) -> AdapterInfo:
        """Resolve and check an adapter before it touches the model (any thread): one line when refused."""
        from kubellm.serve.adapters import check_fingerprint, check_fits_base, inspect_adapter

        if not self.serves_base:
            raise ServingError(
                f"adapter {name}: this server serves {self.source}, a LoRA adapter merged into its "
                "base; serve the base model to add adapters"
            )
        if name == self.name or name in self._views:
            raise ServingError(f"adapter {name}: the name is already served")
        if len(self._views) >= self.cfg.max_adapters:
            raise ServingError(
                f"adapter {name}: {len(self._views)} adapters are loaded, this server's limit (serve.max_adapters)"
            )
        path = resolve_model(uri, tracking=self.tracking, workdir=self.workdir)
        rank, recorded = inspect_adapter(name, path, self.cfg.max_lora_rank)
        if recorded:
            check_fingerprint(name, recorded, self.base_fingerprint())
        check_fits_base(name, path, self._plain)
        return AdapterInfo(name, uri, path, rank, recorded)

    def base_fingerprint(self) -> str | None:
        """Content fingerprint of the served base's weights (:func:`kubellm.tracking.registry.weights_fingerprint`),
        computed once; ``None`` for a Hub id."""
        if self._fingerprint is None and self._base_path and Path(self._base_path).is_dir():
            from kubellm.tracking.registry import weights_fingerprint

            self._fingerprint = weights_fingerprint(self._base_path)
        return self._fingerprint

    def _attach(self, info: AdapterInfo) -> LLMModel:
        """Load the checked adapter into the model (while no forward pass runs) and serve it."""
        from peft import PeftModel

        engine = self.engine
        assert engine is not None
        if engine.per_row_adapters:
            engine.model.load_adapter(info.path, adapter_name=info.name, is_trainable=False)
        else:  # the first adapter: the base becomes a peft model, which then names each row's adapter
            engine.model = PeftModel.from_pretrained(
                engine.model, info.path, adapter_name=info.name, is_trainable=False
            )
            engine.per_row_adapters = True
        engine.model.eval()
        view = self._views[info.name] = self.view(info)
        gather_lora(engine.model, list(self._views))
        log.info("serving adapter %s (rank %d) from %s", info.name, info.rank, info.source)
        for listener in self.listeners:
            listener(info.name, view)
        return view

    async def load_adapter(self, name: str, uri: str) -> LLMModel:
        """Check and load an adapter while serving (vLLM's ``/v1/load_lora_adapter``)."""
        import asyncio

        if name in self._pending:
            raise ServingError(f"adapter {name}: already being loaded")
        self._pending.add(name)
        try:
            info = await asyncio.to_thread(self._prepare_adapter, name, uri)
            assert self.engine is not None
            return await self.engine.exclusive(lambda: self._attach(info))
        finally:
            self._pending.discard(name)

    async def unload_adapter(self, name: str, drain_s: float = 60.0) -> None:
        """Stop serving an adapter: new requests for it get a 404 at once, its requests in flight finish
        (those still running after ``drain_s`` are cancelled), then its weights leave the model."""
        import asyncio

        view = self._views.pop(name, None)
        if view is None:
            raise InvalidRequest(
                f"The lora adapter '{name}' cannot be found.", status=404, param="lora_name", code="model_not_found"
            )
        for listener in self.listeners:
            listener(name, None)
        engine = self.engine
        assert engine is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while engine.uses_adapter(name):
            if loop.time() > deadline:
                engine.cancel_adapter(name)
            await asyncio.sleep(0.05)

        def remove() -> None:
            engine.model.delete_adapter(name)
            gather_lora(engine.model, list(self._views))

        await engine.exclusive(remove)
        log.info("adapter %s unloaded", name)

    async def healthy(self) -> bool:
        """Whether the model can answer: loaded, and its engine generating (see
        :attr:`GenerationEngine.accepting`)."""
        return bool(self.ready and self.engine is not None and self.engine.accepting)

    # --- requests, shared by every protocol ---

    def encode_prompt(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """Token ids of a completion prompt (text, or ids as they are), within ``max_prompt_tokens``."""
        if isinstance(prompt, str):
            self._check_chars(len(prompt), param)
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            self._check_length(prompt, param)  # before looking at every id of a long list
            vocab = len(self.tokenizer)
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
                raise InvalidRequest(f"{param}: token ids must be integers in [0, {vocab})", param=param)
            ids = list(prompt)
        return self._check_length(ids, param)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat, formatted with the tokenizer's chat template and a generation prompt.

        A tokenizer without a template gets a plain ``role: content`` transcript ending in ``assistant:``.
        """
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = self.tokenizer(text)["input_ids"]
        return self._check_length(ids, "messages")

    async def encode_prompts(self, prompts: list[str | list[int]], param: str = "prompt") -> list[list[int]]:
        """:meth:`encode_prompt` of each prompt on a worker thread; ``param[i]`` names one of several."""
        import asyncio

        self.check_prompt_count(len(prompts), param)
        names = [param] if len(prompts) == 1 else [f"{param}[{i}]" for i in range(len(prompts))]
        return await asyncio.to_thread(lambda: [self.encode_prompt(p, n) for p, n in zip(prompts, names, strict=True)])

    async def encode_chat_async(self, messages: list[dict[str, str]]) -> list[int]:
        """:meth:`encode_chat` on a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.encode_chat, messages)

    def check_prompt_count(self, count: int, param: str) -> None:
        """A request with more prompts than the queue holds could never be served: a 400, not a 503."""
        if count > self.cfg.max_queue:
            raise InvalidRequest(
                f"{param}: {count} prompts in one request, more than this server's limit of "
                f"{self.cfg.max_queue} (serve.max_queue); send them in smaller requests",
                param=param,
            )

    def _check_chars(self, chars: int, param: str) -> None:
        # No tokenizer call when the text is longer than max_prompt_tokens could ever cover: a 20 MB
        # message took 26 s to tokenize before it was refused.
        if self.max_prompt_chars and chars > self.max_prompt_chars:
            raise InvalidRequest(
                f"{param}: the prompt is {chars} characters, more than this server's limit of "
                f"{self.cfg.max_prompt_tokens} tokens can hold",
                param=param,
                code="context_length_exceeded",
            )

    def _check_length(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise InvalidRequest(f"{param}: the prompt is empty", param=param)
        if len(ids) > self.cfg.max_prompt_tokens:
            raise InvalidRequest(
                f"{param}: the prompt is {len(ids)} tokens, more than this server's limit of "
                f"{self.cfg.max_prompt_tokens}",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def sampling(
        self,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        min_tokens: int | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        allow_no_tokens: bool = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        logit_bias: dict[str, Any] | None = None,
    ) -> SamplingParams:
        """Validated generation settings (the same limits on every protocol; OpenAI's and vLLM's ranges).

        ``allow_no_tokens``: ``max_tokens`` 0 is valid (a completion that echoes and scores its prompt).
        """
        limit = self.cfg.max_new_tokens
        least = 0 if allow_no_tokens else 1
        max_tokens = self.cfg.default_max_tokens if max_tokens is None else max_tokens
        checks = [
            (
                isinstance(max_tokens, int) and least <= max_tokens <= limit,
                "max_tokens",
                f"must be an integer from {least} to {limit} (this server's limit), got {max_tokens!r}",
            ),
            (
                temperature is None or (_number(temperature) and 0 <= temperature <= 2),
                "temperature",
                f"must be a number from 0 to 2, got {temperature!r}",
            ),
            (
                top_p is None or (_number(top_p) and 0 < top_p <= 1),
                "top_p",
                f"must be a number in (0, 1], got {top_p!r}",
            ),
            (seed is None or isinstance(seed, int), "seed", f"must be an integer, got {seed!r}"),
            (
                min_tokens is None or (isinstance(min_tokens, int) and 0 <= min_tokens <= max_tokens),
                "min_tokens",
                f"must be an integer from 0 to max_tokens, got {min_tokens!r}",
            ),
            (
                logprobs is None or 0 <= logprobs <= self.cfg.max_logprobs,
                "logprobs",
                f"must be from 0 to {self.cfg.max_logprobs} (this server's limit), got {logprobs!r}",
            ),
            (
                presence_penalty is None or (_number(presence_penalty) and -2 <= presence_penalty <= 2),
                "presence_penalty",
                f"must be a number from -2 to 2, got {presence_penalty!r}",
            ),
            (
                frequency_penalty is None or (_number(frequency_penalty) and -2 <= frequency_penalty <= 2),
                "frequency_penalty",
                f"must be a number from -2 to 2, got {frequency_penalty!r}",
            ),
            (
                repetition_penalty is None or (_number(repetition_penalty) and 0 < repetition_penalty <= 2),
                "repetition_penalty",
                f"must be a number in (0, 2], got {repetition_penalty!r}",
            ),
        ]
        for ok, param, why in checks:
            if not ok:
                raise InvalidRequest(f"{param}: {why}", param=param)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise InvalidRequest("stop: at most 4 non-empty strings", param="stop")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(temperature or 0.0),
            top_p=float(1.0 if top_p is None else top_p),
            stop=tuple(stops),
            seed=seed,
            min_tokens=min_tokens or 0,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            adapter=self.adapter.name if self.adapter is not None else None,
            presence_penalty=float(presence_penalty or 0.0),
            frequency_penalty=float(frequency_penalty or 0.0),
            repetition_penalty=float(1.0 if repetition_penalty is None else repetition_penalty),
            logit_bias=self._logit_bias(logit_bias),
        )

    def _logit_bias(self, bias: dict[str, Any] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``logit_bias`` (token id as a string → -100 to 100, at most 300) as pairs."""
        if not bias:
            return ()
        if not isinstance(bias, dict) or len(bias) > 300:
            raise InvalidRequest("logit_bias: a map of at most 300 token ids to numbers", param="logit_bias")
        vocab = len(self.tokenizer)
        pairs = []
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.isdigit() else -1
            if not 0 <= token < vocab:
                raise InvalidRequest(f"logit_bias: {key!r} is not a token id in [0, {vocab})", param="logit_bias")
            if not _number(value) or not -100 <= value <= 100:
                raise InvalidRequest(
                    f"logit_bias[{key}]: must be a number from -100 to 100, got {value!r}", param="logit_bias"
                )
            pairs.append((token, float(value)))
        return tuple(pairs)

    def submit(self, ids: list[int], params: SamplingParams) -> GenerationRequest:
        return self.submit_all([(ids, params)])[0]

    def submit_all(self, jobs: list[tuple[list[int], SamplingParams]]) -> list[GenerationRequest]:
        """Queue every job of one request, or none (:meth:`GenerationEngine.submit_all`)."""
        if self.engine is None:
            raise ServingError(f"model {self.name} is not loaded")
        if self.adapter is not None and self.base._views.get(self.name) is not self:
            # Unloaded while this request was being tokenized: its weights may be gone.
            raise InvalidRequest(
                f"The model '{self.name}' does not exist (unloaded)", status=404, param="model", code="model_not_found"
            )
        return self.engine.submit_all(jobs)

    # --- KServe V1 / V2 ---

    def get_input_types(self) -> list[dict]:
        return [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]

    async def predict(
        self, payload: Any, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None
    ) -> Any:
        """V1 (a dict of ``instances``) or V2 (an ``InferRequest`` with ``text_input``)."""
        if isinstance(payload, kserve.InferRequest):
            return await self._predict_v2(payload)
        if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list) or not payload["instances"]:
            raise InvalidRequest(
                'expected {"instances": ["prompt", ...]} with at least one instance', param="instances"
            )
        shared = _settings(payload.get("parameters") or {}, "parameters")
        self.check_prompt_count(len(payload["instances"]), "instances")
        prompts, settings = [], []
        for i, inst in enumerate(payload["instances"]):
            if isinstance(inst, str):
                prompt, own = inst, {}
            elif isinstance(inst, dict) and isinstance(inst.get("prompt"), str):
                own = dict(inst)
                prompt = own.pop("prompt")
                own = _settings(own, f"instances[{i}]")
            else:
                raise InvalidRequest(
                    f'instances[{i}]: expected a prompt string or {{"prompt": ...}}', param=f"instances[{i}]"
                )
            prompts.append(prompt)
            settings.append(self.sampling(**{**shared, **own}))
        ids = await self.encode_prompts(prompts, "instances")
        results = await _run_all(self, list(zip(ids, settings, strict=True)))
        return {"predictions": [c.text for c in results]}

    async def _predict_v2(self, request: Any) -> Any:
        inputs = {i.name: i for i in request.inputs}
        if "text_input" not in inputs:
            raise InvalidRequest(
                f"V2 request needs a BYTES input named text_input (got {sorted(inputs)})", param="inputs"
            )
        texts = _v2_texts(inputs["text_input"])
        params = self.sampling(**_settings(dict(request.parameters or {}), "parameters"))
        ids = await self.encode_prompts(texts, "text_input")
        results = await _run_all(self, [(i, params) for i in ids])
        output = kserve.InferOutput("text_output", [len(results)], "BYTES", [c.text for c in results])
        return kserve.InferResponse(
            response_id=request.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=[output]
        )


def _v2_texts(tensor: Any) -> list[str]:
    """The strings of a BYTES tensor: JSON requests carry ``str``, binary ones ``bytes``, maybe nested."""
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"text_input: expected datatype BYTES, got {tensor.datatype}", param="inputs")
    flat: list[Any] = []
    stack = [tensor.data if tensor.data is not None else []]
    while stack:
        item = stack.pop()
        if isinstance(item, list | tuple):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    try:
        return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in flat]
    except UnicodeDecodeError:
        raise InvalidRequest("text_input: not UTF-8 text", param="inputs") from None


_SETTINGS = (
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def _settings(values: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(_SETTINGS))
    if unknown:
        raise InvalidRequest(f"{where}: unknown generation setting(s) {unknown}; known: {list(_SETTINGS)}", param=where)
    # V2 parameters may arrive as JSON text ("[\"\\n\"]" for a list of stop strings).
    return {k: (_maybe_json(v) if k == "stop" else v) for k, v in values.items()}


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


async def _run_all(model: LLMModel, jobs: list[tuple[list[int], SamplingParams]]) -> list[Completion]:
    """Submit every job before awaiting any, so one request's instances share a batch."""
    return await results_of(model.submit_all(jobs))


async def results_of(requests: list[GenerationRequest]) -> list[Completion]:
    """Every request's completion; when one fails (or the caller is cancelled) the others are cancelled
    too, so nothing is generated for nobody."""
    import asyncio

    try:
        return list(await asyncio.gather(*(r.result() for r in requests)))
    finally:
        for r in requests:
            r.cancel()
