"""Numeric precision: pick bf16 where the hardware runs it natively, fp32 elsewhere.

On these 2-core AMD machines (AVX512-BF16 through oneDNN) a bf16 matmul peaks near 800–900 GFLOP/s
against ~200 GFLOP/s in fp32, and bf16 autocast trains a 7 M-parameter Llama 1.84× faster. Without
native bf16 the same autocast is *slower* than fp32 (emulated), hence the capability check.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

Precision = Literal["fp32", "bf16"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX-BF16 and oneDNN can use it."""
    import torch

    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():  # not Linux: trust oneDNN's own answer
        return True
    flags = cpuinfo.read_text(errors="replace")
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(setting: str, device: str) -> Precision:
    """``auto`` → bf16 on CUDA with bf16 support or a CPU with native bf16, else fp32."""
    import torch

    if setting in ("fp32", "bf16"):
        return setting  # type: ignore[return-value]
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@contextlib.contextmanager
def autocast(precision: Precision, device: str) -> Iterator[None]:
    """Mixed precision for the forward pass: weights and optimizer state stay fp32."""
    import torch

    if precision == "bf16":
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            yield
    else:
        yield


# -- bf16 on the CPU: attention and rotary embeddings ------------------------------------------------
#: The attention implementation :func:`cpu_bf16_fast_path` installs (registered with transformers).
CPU_BF16_ATTENTION = "kubellm_cpu_bf16"
# Keyword arguments that select attention variants the fast path does not implement (sliding windows,
# logit soft-capping, attention sinks, ALiBi-style biases): such models keep transformers' SDPA.
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias")
_causal_masks: dict[tuple[int, int, str], Any] = {}


def _causal_mask(length: int, rep: int, device: Any) -> Any:
    """Additive causal mask (0 / bf16 min), tiled ``rep`` times along the query axis; cached."""
    import torch

    key = (length, rep, str(device))
    if key not in _causal_masks:
        low = torch.finfo(torch.bfloat16).min
        mask = torch.full((length, length), low, dtype=torch.bfloat16, device=device).triu(1)
        _causal_masks[key] = mask.repeat(rep, 1)
    return _causal_masks[key]


def cpu_bf16_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Causal self-attention as two bf16 batched matmuls and a softmax, for training under CPU autocast.

    PyTorch's CPU flash-attention kernel computes bf16 *slower* than fp32 (fwd+bwd of 4 × 12 heads ×
    256 × 64 on one thread: 36 ms in bf16, 35 ms in fp32), while oneDNN's bf16 ``bmm`` runs near the
    matmul peak: this path takes 17 ms there, and cut the attention share of a ``small``-preset bf16
    step from 34 % to 16 %. The scores are rounded to bf16 before the softmax (which accumulates in
    fp32), exactly as transformers' eager attention does under autocast. Grouped-query attention needs
    no ``repeat_kv`` copy: the query heads that share a key/value head are stacked along the query axis.
    Anything else (no autocast, a KV cache, sliding windows, …) goes to transformers' SDPA path.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    plain = (
        not torch.is_autocast_enabled("cpu")
        or query.device.type != "cpu"
        or key.shape[2] != length
        or not getattr(module, "is_causal", True)
        or heads % kv_heads
        or any(kwargs.get(k) is not None for k in _UNSUPPORTED)
    )
    if plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rep, bf16 = heads // kv_heads, torch.bfloat16
    scale = dim**-0.5 if scaling is None else scaling
    q = query.to(bf16).reshape(batch * kv_heads, rep * length, dim)
    k_t = key.to(bf16).reshape(batch * kv_heads, length, dim).transpose(1, 2)
    if attention_mask is None:  # causal only: the mask is added inside the matmul (beta = 1)
        scores = torch.baddbmm(_causal_mask(length, rep, query.device), q, k_t, alpha=scale)
    else:  # transformers' boolean (batch, 1, q, kv) mask, True = attend; padding is already causal
        additive = torch.zeros(attention_mask.shape, dtype=bf16, device=query.device).masked_fill_(
            ~attention_mask, torch.finfo(bf16).min
        )[:, :, None]
        scores = torch.bmm(q, k_t).view(batch, kv_heads, rep, length, length)
        scores = torch.add(additive, scores, alpha=scale).view(batch * kv_heads, rep * length, length)
    probs = scores.softmax(-1)
    if dropout:
        probs = torch.nn.functional.dropout(probs, dropout, training=True)
    out = torch.bmm(probs, value.to(bf16).reshape(batch * kv_heads, length, dim))
    return out.view(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CPU_BF16_ATTENTION, cpu_bf16_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_BF16_ATTENTION, sdpa_mask)


def _rotary_to_bf16(_module: Any, _args: Any, output: Any) -> Any:
    """Rotary ``cos``/``sin`` come out in the dtype of the fp32 residual stream, which turns every bf16
    query and key into fp32 (and back: 7 % of a ``small`` bf16 step in casts); under autocast use bf16."""
    import torch

    if torch.is_autocast_enabled("cpu") and isinstance(output, tuple):
        return tuple(t.to(torch.bfloat16) for t in output)
    return output


def _frozen_linear_weights(model: Any) -> list[Any]:
    """fp32 weights of ``nn.Linear`` layers that do not train (a LoRA base), except any that is also an
    embedding table (a tied head): a bf16 embedding would turn the fp32 residual stream into bf16. FSDP
    shards are left alone: their storage is FSDP's, and its policy decides the dtype they are gathered in."""
    import torch

    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return [
        w
        for i, w in weights.items()
        if not w.requires_grad and w.dtype == torch.float32 and i not in tables and not hasattr(w, "to_local")
    ]


@contextlib.contextmanager
def cpu_bf16_fast_path(model: Any, precision: Precision, device: str) -> Iterator[bool]:
    """Within the block, ``model`` (a transformers model, or a peft model around one) trains bf16 on a
    CPU through :func:`cpu_bf16_attention` and bf16 rotary embeddings; yields whether it applies. The
    model's own attention setting is restored afterwards (saved configs never name this path). Frozen
    Linear weights (a LoRA base) are held in bf16 within the block — autocast otherwise casts each of
    them in every forward — and get their fp32 values back afterwards (+50 % of their memory meanwhile)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    usable = (
        precision == "bf16"
        and device == "cpu"
        and config is not None
        and hasattr(base, "set_attn_implementation")
        and base._can_set_attn_implementation()
    )
    if not usable:
        yield False
        return
    _register_attention()
    previous = config._attn_implementation
    base.set_attn_implementation(CPU_BF16_ATTENTION)
    rotary = [m for name, m in base.named_modules() if name.endswith("rotary_emb")]
    hooks = [m.register_forward_hook(_rotary_to_bf16) for m in rotary]
    # peft casts each adapter's input to the adapter's fp32 dtype (a copy of every bf16 o_proj/down_proj
    # input); autocast casts it straight back for the matmul, so under autocast that copy is waste.
    casting = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", False)]
    for m in casting:
        m.cast_input_dtype_enabled = False
    frozen = _frozen_linear_weights(model)
    fp32 = [w.data for w in frozen]
    for w in frozen:  # cast once, not in every forward: frozen weights never change
        w.data = w.data.to(torch.bfloat16)
    try:
        yield True
    finally:
        for w, data in zip(frozen, fp32, strict=True):
            w.data = data
        for m in casting:
            m.cast_input_dtype_enabled = True
        for h in hooks:
            h.remove()
        base.set_attn_implementation(previous)
