"""Evaluation and the promotion gate."""

from __future__ import annotations

from pydantic import Field

from kubellm.config.base import StrictModel


class GateConfig(StrictModel):
    """The promotion gate: every rule that is set must hold for ``passed`` to be true."""

    max_perplexity_ratio: float | None = Field(default=0.95, gt=0)
    """Fine-tuned held-out perplexity must be at most this × the base model's (``None``: no rule)."""
    max_perplexity: float | None = Field(default=None, gt=0)
    """Absolute ceiling on the candidate's held-out perplexity."""
    min_rouge_l: float | None = Field(default=None, ge=0, le=1)
    """Floor on the candidate's mean ROUGE-L F1 over the held-out prompts."""
    min_token_f1: float | None = Field(default=None, ge=0, le=1)
    """Floor on the candidate's mean token F1 over the held-out prompts."""


class EvalConfig(StrictModel):
    """``kubellm evaluate``: held-out perplexity, generation metrics, base vs candidate, the gate."""

    max_batches: int | None = Field(default=None, ge=1)
    """Validation batches for perplexity (``None``: the whole validation split)."""
    batch_size: int = Field(default=8, ge=1)
    """Sequences per forward pass for perplexity, and prompts generated together (a batch of 8 gives
    ~5× the tokens/s of one prompt at a time on a CPU; prompts are grouped by length to limit padding)."""
    num_prompts: int = Field(default=16, ge=0)
    """Held-out prompts generated greedily and scored (0 skips generation metrics)."""
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    """Tokens generated per held-out prompt."""
    num_samples_in_report: int = Field(default=3, ge=0)
    """Sample generations shown in the Markdown report."""
    gate: GateConfig = GateConfig()
