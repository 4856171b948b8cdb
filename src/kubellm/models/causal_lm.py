"""Models: build a Llama-architecture decoder from a preset, and load any causal LM for use.

Every stage that needs a model goes through :func:`load_causal_lm`, so the same rules hold everywhere:
safetensors weights only (a pickle ``.bin`` can run code on load), ``trust_remote_code`` only with a
pinned revision, a LoRA adapter directory is recognised and stacked on its base model, and a Hub id
works only where the network allows (otherwise one clear line instead of a retry storm).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubellm.config.train import ModelConfig
from kubellm.errors import TrainingError

if TYPE_CHECKING:
    import torch

# Sizes chosen so each preset has a job: `tiny` (~0.22 M parameters with a 2 k vocabulary) trains in
# seconds on a CPU for tests and `make run`; `small` (~4 M with a 4 k vocabulary) is the training
# benchmark's model (`make bench`); `125m` is GPT-2-small-sized; `1b` follows Llama 3.2 1B's shape (GQA 32/8);
# `8b` Llama 3.1 8B's (untied head; 8.0 B parameters with its 128 k vocabulary, 7.2 B with a 32 k one).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 176},
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 704},
    "125m": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 12, "intermediate_size": 2048},
    "1b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8, "intermediate_size": 8192},
    "8b": {"hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8, "intermediate_size": 14336},
}
# Tied input/output embeddings halve the embedding share, which dominates the small presets.
_TIED = {"tiny", "small", "1b"}

ADAPTER_CONFIG = "adapter_config.json"


def model_dimensions(cfg: ModelConfig) -> dict[str, int]:
    """The preset's dimensions with the config's explicit overrides applied."""
    dims = dict(PRESETS[cfg.preset])
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(cfg, key)
        if value is not None:
            dims[key] = value
    if dims["hidden_size"] % dims["num_heads"]:
        raise TrainingError(
            f"pretrain.model: hidden_size {dims['hidden_size']} is not divisible by num_heads {dims['num_heads']}"
        )
    if dims["num_heads"] % dims["num_kv_heads"]:
        dims["num_kv_heads"] = dims["num_heads"]  # an override of num_heads alone keeps plain MHA valid
    return dims


def build_model(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    block_size: int,
    bos_token_id: int | None,
    eos_token_id: int,
    pad_token_id: int,
    seed: int = 0,
) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` (fp32, CPU), deterministic for a given seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = model_dimensions(cfg)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_layers"],
        num_attention_heads=dims["num_heads"],
        num_key_value_heads=dims["num_kv_heads"],
        max_position_embeddings=cfg.max_position_embeddings or block_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=cfg.preset in _TIED,
        use_cache=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model


def count_parameters(model: Any, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter directory was trained on (as recorded by peft)."""
    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return cfg.get("base_model_name_or_path")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    source: str
    """What was loaded, for logs: the path, or ``base + adapter``."""
    is_adapter: bool = False


def check_local_weights(path: Path) -> None:
    """Refuse a model directory without safetensors weights (one line naming the directory)."""
    names = {p.name for p in path.iterdir()}
    if any(n.endswith(".safetensors") for n in names):
        return
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        raise TrainingError(
            f"{path}: only pickle weights (.bin/.pt) found; kubellm loads safetensors only "
            "(convert with `save_pretrained(..., safe_serialization=True)`)"
        )
    raise TrainingError(f"{path}: no model weights (*.safetensors) in this directory")


def _hub_kwargs(revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    if trust_remote_code and not revision:
        raise TrainingError("trust_remote_code needs a pinned revision (a commit hash)")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    return kwargs


def _from_pretrained(loader: Any, ref: str, what: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(ref, **kwargs)
    except OSError as err:
        if not Path(ref).exists():
            raise TrainingError(
                f"{what} {ref!r}: not a local directory and not available from the Hugging "
                f"Face Hub here (offline or unknown id): {str(err).splitlines()[0]}"
            ) from None
        raise TrainingError(f"{what} {ref}: cannot be loaded: {str(err).splitlines()[0]}") from None


def load_tokenizer(ref: str | Path, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, str(ref), "tokenizer", **_hub_kwargs(revision, trust_remote_code))


def empty_causal_lm(ref: str | Path, *, revision: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """The model ``ref`` names, built from its config on the meta device (no weights read or allocated),
    in training mode, with its tokenizer: what the ranks other than 0 of a sharded run start from."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hub = _hub_kwargs(revision, trust_remote_code)
    config = _from_pretrained(AutoConfig, str(ref), "model config", **hub)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.train()
    tokenizer = load_tokenizer(ref, revision=revision, trust_remote_code=trust_remote_code)
    return LoadedModel(model, tokenizer, "meta", f"{ref} (empty, on the meta device)")


def load_causal_lm(
    ref: str | Path,
    *,
    base_model: str | Path | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
    for_training: bool = False,
    quantization_config: Any = None,
) -> LoadedModel:
    """Load a causal LM from a local directory (full model or LoRA adapter) or a Hub id.

    ``base_model`` overrides the base recorded in an adapter directory (artifact paths differ between
    the pod that trained the adapter and the one that loads it). ``merge_adapter`` folds the adapter
    into the base weights (faster inference, no peft at serving time). The model is returned in eval
    mode unless ``for_training``. A ``quantization_config`` (bitsandbytes, CUDA only) loads the weights
    quantized straight onto the device (a quantized model cannot be moved afterwards).
    """
    from transformers import AutoModelForCausalLM

    from kubellm.models.precision import resolve_device

    dev = resolve_device(device)
    path = Path(ref)
    hub = _hub_kwargs(revision, trust_remote_code)
    common: dict[str, Any] = {"use_safetensors": True, **({"dtype": dtype} if dtype is not None else {})}
    if quantization_config is not None:
        common.update(quantization_config=quantization_config, device_map={"": dev})

    if path.is_dir() and is_adapter_dir(path):
        from peft import PeftModel

        base_ref = str(base_model) if base_model else adapter_base(path)
        if not base_ref:
            raise TrainingError(f"{path}: adapter without a recorded base model; pass the base model explicitly")
        base = load_causal_lm(
            base_ref,
            device="cpu",
            dtype=dtype,
            revision=revision,
            trust_remote_code=trust_remote_code,
            for_training=for_training,
        )
        check_local_weights(path)
        model = PeftModel.from_pretrained(base.model, str(path), is_trainable=for_training)
        if merge_adapter:
            model = model.merge_and_unload()
        tok_src = path if (path / "tokenizer_config.json").is_file() else Path(base_ref)
        tokenizer = load_tokenizer(tok_src, **({} if tok_src.exists() else hub))
        model.to(dev)
        if not for_training:
            model.eval()
        return LoadedModel(model, tokenizer, dev, f"{base_ref} + adapter {path}", is_adapter=not merge_adapter)

    if path.is_dir():
        check_local_weights(path)
        model = _from_pretrained(AutoModelForCausalLM, str(path), "model", **common)
        tokenizer = load_tokenizer(path)
    elif path.exists():
        raise TrainingError(f"{path}: expected a model directory, found a file")
    else:
        model = _from_pretrained(AutoModelForCausalLM, str(ref), "model", **common, **hub)
        tokenizer = load_tokenizer(str(ref), revision=revision, trust_remote_code=trust_remote_code)
    if quantization_config is None:
        model.to(dev)
    if not for_training:
        model.eval()
    return LoadedModel(model, tokenizer, dev, str(ref))
