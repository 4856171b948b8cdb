"""Sharded data parallelism (FSDP2) for the training loop: ``loop.parallelism: fsdp``.

Why. Under DDP every process holds the whole model, its gradients and both AdamW moments: 16 bytes per
trained parameter (4 weight + 4 gradient + 8 optimizer state), ~112 GB for a 7 B model before one
activation is stored, more than an 80 GB GPU. FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps
1/N of each on each of N processes and all-gathers one decoder block's weights just before its forward
(and again for its backward), freeing them right after: ~16/N bytes per parameter plus about two
blocks' gathered weights. On 2 CPU processes the ``tiny`` preset's parameters, gradients and AdamW
state per process measured 0.5× DDP's (the test holds it to ≤ 0.6×).

Building. Only rank 0 builds or loads the model's weights (the base model of a LoRA run too); the other
ranks build an empty copy on the meta device (:func:`builds_empty`). After sharding, rank 0 sends each
rank its shards (:func:`materialise`), so a 7 B model takes ~28 GB of CPU memory once per node instead
of once per GPU, and no rank ever holds another's shards.

How. Each decoder block (the classes a transformers model lists in ``_no_split_modules``, the unit
accelerate's FSDP auto-wrap uses too) becomes one FSDP unit, then the root (embeddings, final norm and
head; a tied head shares the embedding's unit). FSDP2 replaces parameters by ``DTensor`` shards in
place, so parameter names do not change: optimizer state, checkpoints and the exported model keep
Hugging Face's names. Frozen parameters (a LoRA base) are sharded too and get neither gradients nor
optimizer state: only the adapters train, the base stays sharded.

Mixed precision (:func:`mixed_precision`). With bf16 the gathered weights are bf16 (half the bytes of
the two all-gathers per step, bf16 matmuls), while the sharded master weights and AdamW state stay fp32
and gradients are reduce-scattered in fp32 (torchtitan's default too). A bf16 reduction would cut a
step's traffic from 2·2 + 4 to 2·2 + 2 bytes per parameter (-25 %), but would sum N gradients with an
8-bit mantissa, losing the small updates the fp32 master weights exist to keep (not measured here). On a CPU the policy
applies only when ``loop.precision`` says ``bf16`` explicitly;
``auto`` keeps fp32 weights under bf16 autocast there, as DDP does (both ran at the same speed here).

Speed on 2 CPU processes (gloo, ``small`` preset, ``make bench``, load average 4.4): FSDP took 1.23× DDP's
steps per second in fp32 but 0.59× in bf16 (0.79–0.84× in a rerun at load 3.7): bf16 compute is ~2×
faster, and FSDP's dozen gloo collectives per step (an all-gather per block in the forward and again in
the backward, a reduce-scatter) then weigh more than DDP's one bucketed all-reduce. No GPU has run it.

Activation checkpointing is transformers' own, per decoder block (``loop.gradient_checkpointing``);
FSDP2 composes with it (its pre-backward hook gathers the block again for the recomputation).
Measured as above: 1.73× the seconds per step and 0.93× the peak resident set of a rank (the
activations are a small part of a process holding torch and transformers). ``loop.compile_blocks``
compiles each block's ``forward`` only, so FSDP's hooks and the checkpointing wrapper stay outside the
compiled graph; on the CPU it made a step 1.47× slower, hence off by default.
"""

from __future__ import annotations

from typing import Any

from kubellm.errors import TrainingError
from kubellm.models.tensors import local


def decoder_blocks(model: Any) -> list[Any]:
    """The repeated blocks of ``model`` (a transformers model or a peft model around one), in order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise TrainingError(
            f"loop.parallelism fsdp: cannot find the decoder blocks of this "
            f"{type(base).__name__} (its _no_split_modules is {sorted(names) or 'empty'}); "
            "use parallelism ddp"
        )
    return blocks


def builds_empty(loop: Any, ctx: Any) -> bool:
    """Whether this rank builds its model on the meta device: a sharded multi-process run's ranks but 0."""
    return loop.parallelism == "fsdp" and ctx.distributed and not ctx.is_main


def on_meta(model: Any) -> bool:
    return any(p.is_meta for p in model.parameters())


def materialise(model: Any, full: dict[str, Any], device: str) -> None:
    """Give every rank of a sharded ``model`` its shards of rank 0's weights ``full`` (an empty dict on
    the other ranks), then rank 0's buffers (rotary frequencies and other non-persistent ones are
    computed at init, which the meta device skipped). Every rank calls this (it is a collective)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    kept = {n: b.detach().clone() for n, b in model.named_buffers()} if dist.get_rank() == 0 else {}
    model.to_empty(device=device)  # fresh storage for every shard and buffer, on every rank
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in kept:
                buffer.copy_(kept[name])
            dist.broadcast(buffer, src=0)


def uses_bf16_weights(precision: str, setting: str, device: str) -> bool:
    """Whether FSDP gathers weights in bf16: on CUDA whenever training in bf16; on a CPU only when
    ``loop.precision`` is ``bf16`` itself (``auto`` keeps fp32 weights under autocast there)."""
    return precision == "bf16" and (device.startswith("cuda") or setting == "bf16")


def mixed_precision(bf16_weights: bool) -> Any:
    """FSDP2's policy: bf16 gathered weights with fp32 gradient reduction, or plain fp32."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16_weights:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model: Any, *, bf16_weights: bool) -> int:
    """Apply FSDP2 to every decoder block, then to the root; returns the number of blocks.

    The last block is not resharded after its forward: the backward needs it again at once, so
    freeing and regathering it would only add one all-gather per step.
    """
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(bf16_weights)
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=policy)
    return len(blocks)


def compile_blocks(model: Any) -> int:
    """``torch.compile`` the ``forward`` of every decoder block; returns how many."""
    import torch

    blocks = decoder_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return len(blocks)


def state_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes this process holds of the parameters (frozen ones included), their gradients and the
    optimizer state, read from the tensors themselves (local shards under FSDP)."""
    import torch

    def nbytes(tensors: Any) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in tensors)

    params = list(model.parameters())
    return {
        "parameters": nbytes(params),
        "gradients": nbytes(p.grad for p in params if p.grad is not None),
        "optimizer": nbytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)),
    }


def clip_grad_norm(params: list[Any], max_norm: float) -> float:
    """Global gradient norm over all processes (before clipping); clips to ``max_norm`` (``inf``: none).

    The norm of sharded gradients is a DTensor reduced over the ranks; ``full_tensor`` makes it a plain
    number on every rank, the same one DDP computes from its full gradients.
    """
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen parameters (a LoRA base) are reloaded from the base model, never checkpointed
    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def train_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The trainable weights and optimizer state as torch.distributed.checkpoint saves and loads them:
    keyed by parameter name (not by position), sharded tensors as DTensors."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_options())
    return {"model": weights, "optimizer": optim}


def set_train_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Put a state loaded into :func:`train_state`'s structure back into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=_options()
    )


def gather_trainable(model: Any) -> dict[str, Any]:
    """The full (unsharded) trainable weights on rank 0, on its CPU; an empty dict on the other ranks.

    Gathered one tensor at a time and moved to rank 0's CPU, so no GPU and no other rank ever holds the
    whole model; every rank must call this (it is a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    # A tied parameter (input embedding = output head) comes back as two gathered copies; make them one
    # tensor again so save_pretrained recognises the tie and writes it once, as it does unsharded.
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name and owner in full and name in full:
            full[name] = full[owner]
    return full
