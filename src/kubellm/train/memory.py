"""The memory planner: per-GPU memory of a training stage, estimated before any job waits for its GPUs.

A plan that cannot fit used to show up as an out-of-memory crash after the job had queued for its GPUs,
possibly for hours. :func:`check_stage` refuses it up front (``kubellm check``, and before a training
job manifest is built) with one line saying what would fit, e.g.
``pretrain: ~118 GiB per GPU with ddp on 80 GiB GPUs; fsdp on 16 GPUs needs ~11 GiB``.

The formula, in bytes per GPU, for a Llama-architecture decoder (``P`` parameters, ``Pt`` of them
trained — all for pretraining, the adapters for LoRA — ``L`` blocks of width ``h``, MLP width ``I``,
``kv`` = key/value heads × head size, ``a`` heads, vocabulary ``V``, ``t`` = micro-batch × sequence
tokens, ``N`` processes, ``S`` = N under fsdp and 1 under ddp)::

    weights 4·P/S + AdamW 8·Pt/S                    (fp32 master weights and both moments; a LoRA base
                                                     is loaded in fp32 too)
  + ddp gradient buckets 4·Pt                       (ddp with N > 1: DDP's flat reduction copy)
  + fsdp gathered weights w·(root + 2 blocks)       (the root's embeddings/head stay gathered for the
                                                     step; a block and the prefetched next one; w = 2 in bf16)
  + max(saved for backward, gradients)              (at the start of the backward pass the activations
                                                     are all alive and no gradient yet — ``zero_grad``
                                                     frees them — and by its end the reverse)
      saved for backward = t·(L·layer + root + logits) [+ 2·(linear weights) under bf16 autocast
                           without fsdp: autocast's bf16 weight copies are kept for the backward]
      gradients          = 4·Pt/S [+ (w + 4)·(one block) unsharded under fsdp]
  + 1.5 GiB on a GPU                                (CUDA context, cuBLAS workspace, NCCL buffers)

Per token and block (``layer``) the tensors transformers' Llama saves for the backward pass, read off
``torch.autograd.graph.saved_tensors_hooks`` on one block: the fp32 residual stream into both RMSNorms
(and their normalised output when the norm weight trains), attention's q, k, v, output and log-sum-exp,
the MLP's gate, activation and up outputs, and the linear layers' inputs — once per distinct input in
fp32, once per linear in bf16 (autocast casts for each of them). A frozen linear (a LoRA base) saves no
input; each adapter saves its (dropped-out) input, its dropout mask (1 byte) and its rank-``r`` output::

    pretrain  fp32: 32h + 8kv + 16I + 4a          bf16: 30h + 4kv + 8I + 4a
    LoRA (all 7 projections adapted, dropout > 0)
              fp32: 31h + 8kv + 17I + 28r + 4a    bf16: 27h + 4kv + 9I + 14r + 4a

With activation checkpointing a block keeps only its fp32 input (4h) and one block is recomputed at a
time (+1 ``layer``). The root adds the token ids (8), the final norm (4h, +4h trained) and the head's
input (fp32 4h, bf16 2h, none for a frozen head); the logits 16V in fp32 (logits, log-softmax output,
two gradient buffers) and 14V in bf16 (bf16 logits, fp32 log-softmax and gradients).

Checked against measured peaks (``tests/train/test_train_memory.py``): the kubellm training loop on
CPU presets, tensor bytes tracked with ``torch.distributed._tools.mem_tracker.MemTracker`` (every
storage alive at each moment, the CPU analogue of ``torch.cuda.max_memory_allocated``; RSS would add
the allocator's free lists and the interpreter), within 15 % in fp32 for pretraining with and without
checkpointing and for LoRA; under fsdp the per-process parameter, gradient and optimizer bytes against
those read from the local shards on 2 processes (measured: 0.99×, 0.93× and 0.95× of the peaks for
``small`` pretraining without and with checkpointing and LoRA on it). The bf16 coefficients come from the
same listing with SDPA's flash layout (no ``T×T`` scores) in place of the CPU bf16 attention, and the
ddp-bucket, fsdp-gathered and CUDA terms from how DDP, FSDP2 and CUDA allocate: none of those has been
checked against a measurement, on a GPU or here. Not modelled: QLoRA (4-bit base), tensor/sequence
parallelism, other architectures, fragmentation beyond the fixed reserve.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kubellm.errors import ConfigError

GIB = 2**30
#: CUDA context, cuBLAS workspace and NCCL buffers of one training process (~0.5 + 0.3 + 0.7 GiB).
CUDA_RESERVE = int(1.5 * GIB)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: GPU memory (GiB) by accelerator name, for placements whose label does not say it ("…-80gb" does).
GPU_MEMORY_GIB = {
    "h200": 141,
    "gh200": 96,
    "h100": 80,
    "b200": 180,
    "a100": 40,
    "l40s": 48,
    "l40": 48,
    "l4": 24,
    "a10g": 24,
    "a10": 24,
    "t4": 16,
    "v100": 16,
}
#: Node counts :func:`suggest` tries, times the stage's processes per node.
_NODE_STEPS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool

    @property
    def kv(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one block."""
        h, kv, i = self.hidden, self.kv, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def block_linear(self) -> int:
        return sum(i * o for i, o in self.linear_dims().values())

    def block_params(self) -> int:
        return self.block_linear() + 2 * self.hidden  # + the two RMSNorm weights

    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.block_params() + self.root_params()

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        dims = self.linear_dims()
        return self.layers * sum(rank * sum(dims[t]) for t in targets)


@dataclass(frozen=True)
class Plan:
    """One training stage's shape of work on one process."""

    stage: str
    shape: ModelShape
    seq: int
    micro_batch: int
    precision: str
    """``fp32`` or ``bf16`` (autocast; under fsdp also bf16 gathered weights)."""
    parallelism: str
    processes: int
    checkpointing: bool
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = LLAMA_TARGETS
    lora_dropout: bool = True
    device: str = "cuda"
    procs_per_node: int = 1
    """For suggestions: the process count changes in whole nodes."""


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    parts: dict[str, int] = field(default_factory=dict)
    """Bytes per process of each term of the formula (the ``max`` already taken)."""
    state: int = 0
    """Parameters + gradients + optimizer state per process (4·P/S + 4·Pt/S + 8·Pt/S): what the
    training loop measures from its local shards after the first step (``rank_state_bytes``)."""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def gib(self) -> float:
        return self.total / GIB


def _layer_bytes(p: Plan) -> float:
    """Bytes per token one block saves for the backward pass (the module docstring's table)."""
    s, bf16 = p.shape, p.precision == "bf16"
    h, kv, i, a = s.hidden, s.kv, s.intermediate, s.heads
    e = 2 if bf16 else 4
    core = e * (2 * h + 2 * kv) + 4 * a + 3 * i * e  # q, k, v, attention output, lse; gate, act, up
    if p.lora_rank is None:
        norms = 16 * h  # fp32 input and normalised output of both RMSNorms
        inputs = (3 * h + 2 * h + i) * e if bf16 else (2 * h + i) * e  # per linear / per distinct input
        return norms + core + inputs
    groups = {
        "attn": (h, ("q_proj", "k_proj", "v_proj")),
        "out": (h, ("o_proj",)),
        "mlp": (h, ("gate_proj", "up_proj")),
        "down": (i, ("down_proj",)),
    }
    adapters = 0.0
    for width, members in groups.values():
        n = sum(t in p.lora_targets for t in members)
        if n:
            adapters += width * (e * n if bf16 else e) + (width if p.lora_dropout else 0)
    return 8 * h + core + adapters + len(p.lora_targets) * p.lora_rank * e


def _root_bytes(p: Plan) -> float:
    h, trained = p.shape.hidden, p.lora_rank is None
    head_input = 0 if not trained else 2 * h if p.precision == "bf16" else 4 * h
    return 8 + 4 * h + (4 * h if trained else 0) + head_input


def estimate(p: Plan) -> Estimate:
    """The per-process memory of plan ``p``, term by term (see the module docstring)."""
    s = p.shape
    lora = p.lora_rank is not None
    total = s.params() + (s.lora_params(p.lora_rank, p.lora_targets) if lora else 0)
    trained = s.lora_params(p.lora_rank, p.lora_targets) if lora else total
    fsdp = p.parallelism == "fsdp" and p.processes > 1
    shards = p.processes if fsdp else 1
    bf16 = p.precision == "bf16"
    w = 2 if bf16 else 4
    tokens = p.micro_batch * p.seq
    layer = _layer_bytes(p)
    saved = tokens * ((s.layers * 4 * s.hidden + layer) if p.checkpointing else s.layers * layer)
    saved += tokens * (_root_bytes(p) + s.vocab * (14 if bf16 else 16))
    if bf16 and not fsdp:
        saved += 2 * (s.layers * s.block_linear() + s.vocab * s.hidden)
    block_trained = s.block_params() if not lora else s.lora_params(p.lora_rank, p.lora_targets) // s.layers
    grads = 4 * trained / shards + ((w + 4) * block_trained if fsdp else 0)
    parts = {
        "weights": math.ceil(4 * total / shards),
        "optimizer": math.ceil(8 * trained / shards),
        "ddp_buckets": 4 * trained if p.parallelism == "ddp" and p.processes > 1 else 0,
        "fsdp_gathered": w * (s.root_params() + 2 * s.block_params()) if fsdp else 0,
        "activations_or_gradients": math.ceil(max(saved, grads)),
        "runtime": CUDA_RESERVE if p.device == "cuda" else 0,
    }
    return Estimate(p, parts, state=math.ceil((4 * total + 12 * trained) / shards))


# ------------------------------------------------------------------------------------------ from configs
def gpu_memory_gib(resources: Any) -> float | None:
    """Memory of one GPU of a placement: ``resources.gpu_memory_gib``, else read from the accelerator
    label (``nvidia-h100-80gb`` → 80, ``nvidia-l4`` → 24); ``None`` when neither says."""
    if getattr(resources, "gpu_memory_gib", None):
        return float(resources.gpu_memory_gib)
    label = (resources.accelerator or "").lower()
    m = re.search(r"(\d+)\s*gb?\b", label)
    if m:
        return float(m.group(1))
    for name in sorted(GPU_MEMORY_GIB, key=len, reverse=True):
        if name in label:
            return float(GPU_MEMORY_GIB[name])
    return None


def model_shape(path: str | Path) -> ModelShape | None:
    """The shape of the Hugging Face model directory at ``path`` (from its config.json), or ``None``."""
    try:
        c = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        return ModelShape(
            vocab=c["vocab_size"],
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=c["num_attention_heads"],
            kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            intermediate=c["intermediate_size"],
            tied=bool(c.get("tie_word_embeddings", False)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pretrain_shape(run_cfg: Any) -> ModelShape:
    from kubellm.models.causal_lm import _TIED, model_dimensions

    model = run_cfg.pretrain.model
    d = model_dimensions(model)
    vocab = run_cfg.data.tokenizer.vocab_size if run_cfg.data is not None else 4096
    return ModelShape(
        vocab=vocab,
        hidden=d["hidden_size"],
        layers=d["num_layers"],
        heads=d["num_heads"],
        kv_heads=d["num_kv_heads"],
        intermediate=d["intermediate_size"],
        tied=model.preset in _TIED,
    )


def plan_for(run_cfg: Any, stage: str) -> tuple[Plan | None, str]:
    """The plan of training stage ``stage`` of a run config, or ``None`` and why it cannot be made."""
    section = getattr(run_cfg, stage, None)
    if section is None:
        return None, f"{stage}: no {stage} section"
    dist = run_cfg.platform.distributed_for(stage)
    gpus = run_cfg.platform.placement(stage).resources.gpus
    processes = dist.nodes * dist.procs_per_node if dist.engine != "none" else 1
    device = "cuda" if gpus else "cpu"
    loop = section.loop
    precision = loop.precision if loop.precision != "auto" else "bf16" if device == "cuda" else "fp32"
    common = {
        "micro_batch": loop.micro_batch_size,
        "precision": precision,
        "parallelism": loop.parallelism,
        "processes": processes,
        "checkpointing": loop.gradient_checkpointing,
        "device": device,
        "procs_per_node": dist.procs_per_node if dist.engine != "none" else 1,
    }
    if stage == "pretrain":
        seq = run_cfg.data.block_size if run_cfg.data is not None else section.model.max_position_embeddings
        return Plan(stage, _pretrain_shape(run_cfg), seq or 2048, **common), ""
    if section.quantization == "4bit":
        return None, "finetune: a 4-bit (QLoRA) base is not estimated"
    if section.base_model is None:
        if run_cfg.pretrain is None:
            return None, "finetune: no base model to estimate (finetune.base_model is null, no pretrain section)"
        shape = _pretrain_shape(run_cfg)
    else:
        shape = model_shape(str(section.base_model))
        if shape is None:
            return None, f"finetune: base model {section.base_model} has no config.json readable here; not estimated"
    seq = run_cfg.instruct_data.block_size if run_cfg.instruct_data is not None else 2048
    lora = section.lora
    return Plan(
        stage,
        shape,
        seq,
        lora_rank=lora.r,
        lora_targets=tuple(lora.target_modules or LLAMA_TARGETS),
        lora_dropout=lora.dropout > 0,
        **common,
    ), ""


def suggest(p: Plan, limit: float) -> str:
    """What would fit under ``limit`` bytes: fsdp on these GPUs, then with activation checkpointing,
    then on more nodes, then with micro-batches of 1 (the first that fits)."""
    tried = [replace(p, parallelism="fsdp")]
    tried += [
        replace(p, parallelism="fsdp", checkpointing=True, processes=n * p.procs_per_node)
        for n in _NODE_STEPS
        if n * p.procs_per_node >= p.processes
    ]
    tried += [replace(t, micro_batch=1) for t in tried if p.micro_batch > 1]
    for t in tried:
        e = estimate(t)
        if e.total <= limit:
            how = "fsdp" + (" with gradient_checkpointing" if t.checkpointing and not p.checkpointing else "")
            batch = "" if t.micro_batch == p.micro_batch else ", micro_batch_size 1"
            return f"{how}{batch} on {t.processes} GPUs needs ~{e.gib:.0f} GiB"
    return (
        f"even fsdp with gradient_checkpointing on {tried[-1].processes} GPUs needs "
        f"~{estimate(tried[-1]).gib:.0f} GiB: lower the block size or the model size"
    )


def describe(e: Estimate) -> str:
    p = e.plan
    lora = f", LoRA r={p.lora_rank}" if p.lora_rank is not None else ""
    ckpt = ", gradient_checkpointing" if p.checkpointing else ""
    n = p.shape.params()
    size = f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
    return (
        f"{p.stage}: ~{e.gib:.1f} GiB per {'GPU' if p.device == 'cuda' else 'process'} "
        f"({size} parameters{lora}, {p.parallelism} on {p.processes} "
        f"process{'es' if p.processes > 1 else ''}, {p.precision}, {p.micro_batch} × {p.seq} tokens{ckpt})"
    )


def check_stage(run_cfg: Any, stage: str) -> tuple[Estimate | None, str]:
    """Estimate ``stage`` of ``run_cfg``; returns the estimate and a line describing it (or why there is
    none). Raises :class:`ConfigError` with one line when it cannot fit its placement's GPUs."""
    plan, why = plan_for(run_cfg, stage)
    if plan is None:
        return None, why
    e = estimate(plan)
    memory = gpu_memory_gib(run_cfg.platform.placement(stage).resources) if plan.device == "cuda" else None
    if memory is None:
        return e, describe(e) + (
            ""
            if plan.device == "cpu"
            else "; GPU memory unknown (set resources.gpu_memory_gib or an accelerator label): not checked"
        )
    if e.total > memory * GIB:
        raise ConfigError(
            f"{stage}: ~{e.gib:.0f} GiB per GPU with {plan.parallelism} on {memory:.0f} GiB GPUs; "
            f"{suggest(plan, memory * GIB)}"
        )
    return e, f"{describe(e)}: fits {memory:.0f} GiB GPUs"
