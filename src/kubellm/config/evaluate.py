"""Evaluation, benchmarks and the promotion gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kubellm.config.base import StrictModel

#: kubellm's own lm-eval tasks, made at evaluation time from the prepared held-out set (offline).
LOCAL_TASKS = ("kubellm_choice", "kubellm_complete")


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
    max_empty_answer_rate: float | None = Field(default=0.5, ge=0, le=1)
    """Ceiling on the share of held-out prompts the candidate answers with nothing: a model that mostly
    stops at once can still lower perplexity, and must never become champion. Needs generation metrics
    (instruction data, ``num_prompts`` > 0): without them the rule is not evaluable and fails."""
    max_generation_drop: float | None = Field(default=0.0, ge=0, le=1)
    """How far each generation metric (exact match, token F1, ROUGE-L, code parse rate) may fall below
    the base model's, as a difference of means (0.0: never worse than the base). Needs a base model and
    generation metrics."""
    max_benchmark_drop: float | None = Field(default=1.0, ge=0, le=100)
    """How many points (score × 100) each benchmark score where higher is better may fall below the base
    model's; applies to every task in ``evaluate.benchmarks`` (none listed: no rule)."""
    min_benchmark: dict[str, float] = Field(default_factory=dict)
    """Floors on benchmark scores, keyed ``<task>.<metric>`` as in metrics (without ``bench.``), e.g.
    ``{"kubellm_choice.acc": 0.4}``; the task must be listed in ``evaluate.benchmarks``."""


class BenchmarkConfig(StrictModel):
    """One lm-evaluation-harness task, run on the candidate and on the base with the same settings."""

    task: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    """``kubellm_choice`` (which held-out answer answers this prompt: the true one among 4, scored by
    log-likelihood) or ``kubellm_complete`` (greedy answers to held-out prompts), both made offline from
    the prepared held-out set; or any task or group of lm-eval 0.4.13 (``arc_easy``, ``hellaswag``,
    ``gsm8k`` …), whose data comes from the Hugging Face Hub (a cluster that reaches it)."""
    num_fewshot: int | None = Field(default=None, ge=0, le=64)
    """Examples shown before each question (``None``: the task's own default, 0 for kubellm's tasks)."""
    limit: int | None = Field(default=None, ge=1)
    """Examples scored (``None``: all). Scores over few examples move in coarse steps (20 examples:
    5 points each), so pair small limits with a looser ``gate.max_benchmark_drop``."""


class EvalConfig(StrictModel):
    """``kubellm evaluate``: held-out perplexity, generation metrics, benchmarks, base vs candidate, the gate."""

    max_batches: int | None = Field(default=None, ge=1)
    """Validation batches for perplexity (``None``: the whole validation split)."""
    batch_size: int = Field(default=8, ge=1)
    """Sequences per forward pass for perplexity, and prompts generated together (a batch of 8 gives
    ~5× the tokens/s of one prompt at a time on a CPU; prompts are grouped by length to limit padding).
    Benchmarks use it as lm-eval's batch size."""
    num_prompts: int = Field(default=16, ge=0)
    """Held-out prompts generated greedily and scored (0 skips generation metrics)."""
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    """Tokens generated per held-out prompt (and per ``kubellm_complete`` example). An answer cut off
    mid-function does not parse, so this bounds ``code_parse_rate``."""
    code_metric: Literal["auto", "on", "off"] = "auto"
    """``code_parse_rate``: the share of answers whose code parses with ``ast.parse`` and holds a statement
    (comments alone do not count). ``auto`` measures it
    when at least 80 % of the held-out reference answers are Python code (the built-in
    ``builtin://stdlib-instruct`` data's are all functions)."""
    num_samples_in_report: int = Field(default=3, ge=0)
    """Sample generations shown in the Markdown report."""
    benchmarks: list[BenchmarkConfig] = Field(default_factory=list)
    """lm-evaluation-harness tasks scored for the candidate and the base (``bench.<task>.<metric>``);
    needs the ``eval`` extra (``pip install 'kubellm[eval]'``)."""
    seed: int = 0
    """Seed of the local multiple-choice task (which answers are the distractors, where the true one
    sits) and of lm-eval's few-shot sampling: equal seeds give equal tasks."""
    gate: GateConfig = GateConfig()

    @model_validator(mode="after")
    def _benchmarks_consistent(self) -> EvalConfig:
        tasks = [b.task for b in self.benchmarks]
        twice = sorted({t for t in tasks if tasks.count(t) > 1})
        if twice:
            raise ValueError(f"benchmarks: task {twice[0]!r} is listed twice")
        for key in self.gate.min_benchmark:
            task, dot, metric = key.rpartition(".")
            if not dot or not task or not metric:
                raise ValueError(f"gate.min_benchmark: {key!r} is not <task>.<metric> (e.g. kubellm_choice.acc)")
            if task not in tasks:
                raise ValueError(
                    f"gate.min_benchmark: {key!r} names task {task!r}, which is not in "
                    f"evaluate.benchmarks ({', '.join(tasks) or 'none listed'})"
                )
        return self
