"""Training configs: the model to build, the optimizer, the loop, pretraining and LoRA fine-tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kubellm.config.base import StrictModel
from kubellm.config.secrets import Uri


class ModelConfig(StrictModel):
    """A decoder-only Llama-architecture model, from a size preset with optional explicit overrides."""

    preset: Literal["tiny", "small", "125m", "1b", "8b"] = "tiny"
    """``tiny`` (~0.2 M parameters with a 2 k vocabulary, trains in seconds on a CPU), ``small`` (~4 M), ``125m``,
    ``1b``, ``8b`` (Llama 3.1 8B's shape: needs ``parallelism: fsdp`` on several GPUs)."""
    hidden_size: int | None = Field(default=None, ge=8)
    """Model width (overrides the preset)."""
    num_layers: int | None = Field(default=None, ge=1)
    """Transformer blocks (overrides the preset)."""
    num_heads: int | None = Field(default=None, ge=1)
    """Attention heads; must divide ``hidden_size``."""
    num_kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads (grouped-query attention); must divide ``num_heads``."""
    intermediate_size: int | None = Field(default=None, ge=8)
    """MLP width (overrides the preset)."""
    max_position_embeddings: int | None = Field(default=None, ge=8)
    """Defaults to the prepared dataset's block size."""

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.hidden_size and self.num_heads and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self


class OptimConfig(StrictModel):
    """AdamW with linear warmup and cosine decay."""

    lr: float = Field(default=3e-4, gt=0, le=1.0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final learning rate as a fraction of ``lr`` at the end of the cosine decay."""
    warmup_steps: int = Field(default=10, ge=0)
    """Steps of linear warmup from 0 to ``lr``."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Decoupled weight decay (not applied to norms and biases)."""
    beta1: float = Field(default=0.9, gt=0, lt=1)
    """AdamW first-moment decay."""
    beta2: float = Field(default=0.95, gt=0, lt=1)
    """AdamW second-moment decay."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this (``None``: no clipping)."""


class LoopConfig(StrictModel):
    """The training loop shared by pretraining and fine-tuning."""

    max_steps: int = Field(default=100, ge=1)
    """Optimizer steps (each one ``micro_batch_size × grad_accum_steps × world size`` sequences)."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Sequences per forward pass per process."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Micro-batches accumulated into one optimizer step."""
    global_batch_size: int | None = Field(default=None, ge=1)
    """Sequences per optimizer step over all processes. Set, it replaces ``grad_accum_steps``: each
    attempt accumulates ``global_batch_size / (micro_batch_size × processes)`` micro-batches, so a run
    resumed on another number of processes (a 4-GPU job continued on 2) takes the same optimizer steps
    over the same rows and continues the same loss curve. ``None``: ``grad_accum_steps`` per process."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """How the processes of a multi-process run hold the model. ``ddp``: each holds all of it, its
    gradients and both AdamW moments (~16 bytes per trained parameter: a 7 B model needs ~112 GB, more
    than one 80 GB GPU). ``fsdp``: FSDP2 shards parameters, gradients and optimizer state over the
    processes (~16/N bytes each) and gathers one decoder block at a time; checkpoints are sharded
    (torch.distributed.checkpoint) and resume on another number of processes. Fixed for a run."""
    compile_blocks: bool = False
    """``torch.compile`` each decoder block's forward. Off by default: on 2 CPU processes it made FSDP
    steps 1.47× slower (``make bench``), and on a GPU it has not been measured yet (``benchmarks/gpu.py``
    does; torchtitan reports +16 % tokens/s for Llama-3.1 8B on H100s)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto`` picks bf16 autocast where the hardware runs it natively (CUDA with bf16, or a CPU with
    AVX512-BF16/AMX: about 1.7× faster than fp32 on these machines), fp32 elsewhere."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30 % more compute."""
    seed: int = 1234
    """Seeds model init, data order and dropout: equal seeds give equal runs on CPU."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Write a resumable checkpoint every this many steps (and on SIGTERM)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Keep the newest this many complete checkpoints."""
    log_every: int = Field(default=10, ge=1)
    """Log a progress line (and metrics to the tracker) every this many steps."""
    eval_every: int | None = Field(default=None, ge=1)
    """Compute validation loss every this many steps (``None``: only at the end)."""
    eval_batches: int = Field(default=8, ge=1)
    """Validation batches used for each validation loss."""
    num_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes (0 loads in the training process)."""
    max_nonfinite_steps: int = Field(default=3, ge=1)
    """Stop with an error after this many consecutive steps whose loss or gradient norm is NaN or
    infinite. Each such step is skipped (no weight changes), so a rare bad batch costs one step, while a
    diverged run stops within a few steps instead of training on, and writing, NaN weights."""

    @model_validator(mode="after")
    def _batch(self) -> LoopConfig:
        if self.global_batch_size is not None:
            if self.grad_accum_steps != 1:
                raise ValueError("set either grad_accum_steps or global_batch_size, not both")
            if self.global_batch_size % self.micro_batch_size:
                raise ValueError(
                    f"global_batch_size ({self.global_batch_size}) is not a multiple of "
                    f"micro_batch_size ({self.micro_batch_size})"
                )
        return self


class PretrainConfig(StrictModel):
    """``kubellm pretrain``: train a model from scratch on a prepared pretraining dataset."""

    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    loop: LoopConfig = LoopConfig()


class LoraConfig(StrictModel):
    """Low-rank adapters (peft)."""

    r: int = Field(default=8, ge=1, le=1024)
    """Adapter rank."""
    alpha: float = Field(default=16, gt=0)
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] | None = None
    """Module names to adapt; ``None`` detects them from the architecture (attention and MLP
    projections for Llama-style models)."""


class FinetuneConfig(StrictModel):
    """``kubellm finetune``: LoRA fine-tuning of a causal LM on a prepared instruction dataset."""

    base_model: Uri | None = None
    """A local Hugging Face model directory or a Hub id. ``None`` in a lifecycle run means the model
    the pretraining stage produced."""
    revision: str | None = None
    """Pinned revision of a Hub model (required for ``trust_remote_code``)."""
    trust_remote_code: bool = False
    """Run model code shipped with a Hub model (only with a pinned ``revision``)."""
    lora: LoraConfig = LoraConfig()
    quantization: Literal["none", "4bit"] = "none"
    """``4bit`` is QLoRA: needs a CUDA GPU and bitsandbytes, refused with a clear error elsewhere."""
    merge: bool = False
    """Also write the base model with the adapter merged in (``merged/``)."""
    optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=5)
    loop: LoopConfig = LoopConfig(max_steps=50)

    @model_validator(mode="after")
    def _remote_code(self) -> FinetuneConfig:
        if self.trust_remote_code and not self.revision:
            raise ValueError("trust_remote_code needs a pinned revision (set finetune.revision)")
        if self.quantization == "4bit" and self.loop.parallelism == "fsdp":
            raise ValueError(
                "loop.parallelism fsdp cannot shard 4-bit (bitsandbytes) weights; use "
                "quantization none (fsdp already spreads the base over the GPUs) or parallelism ddp"
            )
        if self.merge and self.quantization == "4bit":
            # Folding an adapter into 4-bit weights rounds it away; merge into the full-precision base
            # instead (load_causal_lm(adapter, merge_adapter=True) does that).
            raise ValueError("merge is not supported with quantization 4bit (merge into the unquantized base)")
        return self
