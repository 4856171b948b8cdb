"""Evaluation stages: evaluate and gate a candidate; compare it with the champion; pick a sweep's best."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kubellm import markdown
from kubellm.config import EvalConfig, GateConfig
from kubellm.stages.base import StageContext, StageOutput, section


def evaluate(
    config: EvalConfig | dict[str, Any],
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    ctx: StageContext,
    *,
    base_model: str | Path | None = None,
    stage: str = "evaluate",
) -> StageOutput:
    """Evaluation and the gate; ``values["passed"]`` is what the pipeline's ``dsl.If`` tests."""
    from kubellm.evaluate.run import OUTPUT_KIND
    from kubellm.evaluate.run import evaluate as run
    from kubellm.fsutil import claim_output

    cfg = section(EvalConfig, config, "evaluate config")
    # A refused output folder fails before the MLflow run opens (the library checks again).
    claim_output(out_dir, OUTPUT_KIND, inputs=[model_dir, data_dir, *([base_model] if base_model else [])])
    with ctx.stage(stage, cfg) as tracker:
        res = run(cfg, model_dir, data_dir, out_dir, base_model=base_model, tracker=tracker)
        link = ctx.run_link(tracker.run_id)
    report = link + Path(res.report_path).read_text(encoding="utf-8")
    metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, int | float)}
    metrics["gate_passed"] = float(res.passed)
    return StageOutput(metrics, report, {"passed": bool(res.passed), "reasons": list(res.reasons), "result": res})


def compare_to_champion(
    config: EvalConfig | dict[str, Any],
    candidate_results: str | Path,
    data_dir: str | Path,
    base_model: str | Path,
    out_dir: str | Path,
    ctx: StageContext,
) -> StageOutput:
    """Evaluate the current champion on the same held-out data; ``passed`` when the candidate beats it
    (:func:`~kubellm.evaluate.compare.beats_champion`) or there is no champion."""
    from kubellm.evaluate.compare import CHAMPION_METRICS, beats_champion
    from kubellm.evaluate.run import EvalResult
    from kubellm.evaluate.run import evaluate as run
    from kubellm.stages.registry import resolve_model
    from kubellm.tracking.registry import ADAPTER_BASE_RECORD, CHAMPION, champion_info, model_uri

    cand = EvalResult.read(candidate_results).metrics
    champ = champion_info(ctx.tracking, ctx.workdir) if ctx.tracking.enabled else None
    if champ is None:
        return StageOutput(
            {"better": 1.0},
            markdown.section("Champion comparison", "No champion yet: the candidate wins."),
            {"passed": True},
        )
    cfg = section(EvalConfig, config, "evaluate config").model_copy(deep=True)
    # A plain measurement: every gate rule off (the verdict here is beats_champion's, not the gate's).
    cfg.gate = GateConfig(
        max_perplexity_ratio=None, max_empty_answer_rate=None, max_generation_drop=None, max_benchmark_drop=None
    )
    champ_dir = resolve_model(model_uri(ctx.tracking.registered_model, alias=CHAMPION), ctx)
    # an adapter version runs on the base it records (fetched with it), not on this run's base: that may be
    # another one (a fine-tune of the champion itself, say)
    champ_base = None if (Path(champ_dir) / ADAPTER_BASE_RECORD).is_file() else base_model
    with ctx.stage("evaluate_champion", cfg) as tracker:
        res = run(cfg, champ_dir, data_dir, out_dir, base_model=champ_base, tracker=tracker)
        passed = beats_champion(cand, res.metrics)
        tracker.log_metrics({"candidate_better": float(passed)})
    rows = [(k, cand.get(k), res.metrics.get(k)) for k in CHAMPION_METRICS if k in cand or k in res.metrics]
    verdict = "Candidate is better: promote." if passed else "Champion stays: candidate is not better."
    report = markdown.section(
        f"Candidate vs champion v{champ.version}",
        ctx.run_link(tracker.run_id),
        markdown.table(["metric", "candidate", "champion"], rows),
        verdict,
    )
    return StageOutput(
        {"candidate_better": float(passed), "champion_perplexity": res.metrics["perplexity"]},
        report,
        {"passed": passed},
    )


def select_best(
    results_dirs: list[str],
    adapter_dirs: list[str],
    metric: str,
    mode: str,
    best_adapter_out: str,
    best_results_out: str,
) -> StageOutput:
    """Copy the best trial (among those whose gate passed) to the outputs; ``values["passed"]`` is
    False when no trial passed."""
    from kubellm.evaluate.compare import rank_trials
    from kubellm.evaluate.run import EvalResult

    results = [EvalResult.read(d) for d in results_dirs]
    trials = [(r.passed, r.metrics.get(metric)) for r in results]
    best = rank_trials(trials, mode)
    table = markdown.table(
        ["trial", "gate passed", metric], [(i + 1, "yes" if ok else "no", v) for i, (ok, v) in enumerate(trials)]
    )
    if best is None:
        verdict = "No trial passed the gate: nothing is registered."
    else:
        verdict = f"Best: trial {best + 1} ({metric} = {trials[best][1]})."
        shutil.copytree(adapter_dirs[best], best_adapter_out)
        shutil.copytree(results_dirs[best], best_results_out)
    return StageOutput(
        {"best_trial": float(best + 1) if best is not None else 0.0},
        markdown.section("Sweep", table, verdict),
        {"passed": best is not None},
    )
