"""Evaluation component: held-out metrics, base vs candidate, and the promotion gate."""

from typing import List

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from kubellm.components._base import component


@component
def evaluate(
    config: dict,
    tracking: dict,
    workdir: str,
    data: Input[Dataset],
    model: Input[Model],
    base_model: Input[Model],
    results: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[Markdown],
    trial: dict = {},
) -> bool:
    """Evaluate a candidate against its base model and apply the promotion gate.

    Held-out perplexity (token-weighted, same masking as training) for both models, and for
    instruction data greedy generations scored by exact match, token F1 and ROUGE-L, side by side.

    Args:
        config: The ``evaluate`` section (``kubellm.config.EvalConfig``, gate rules included).
        tracking: The tracking section.
        workdir: Local working directory.
        data: The prepared dataset whose validation split and held-out prompts are used.
        model: The candidate (a full model or a LoRA adapter).
        base_model: The model the candidate is compared with.
        results: metrics.json, report.md and loss_curve.png.
        metrics: The evaluation metrics and ``gate_passed``.
        report: Metrics tables, gate rules and sample generations.
        trial: The sweep trial being evaluated (names this stage's MLflow run).

    Returns:
        Whether the promotion gate passed.
    """
    from kubellm.stages import StageContext, evaluate, publish, trial_stage

    ctx = StageContext.from_param(tracking, workdir)  # the parent run: by KFP run id, outside the cache key
    out = evaluate.evaluate(
        config,
        model.path,
        data.path,
        results.path,
        ctx,
        base_model=base_model.path,
        stage=trial_stage("evaluate", trial or None),
    )
    publish(out, report=report.path, metrics=metrics, artifact=results)
    return out.values["passed"]


@component
def compare_with_champion(
    config: dict,
    tracking: dict,
    workdir: str,
    parent_run_id: str,
    data: Input[Dataset],
    base_model: Input[Model],
    candidate_results: Input[Artifact],
    results: Output[Artifact],
    report: Output[Markdown],
) -> bool:
    """Evaluate the current champion on the candidate's held-out data and say whether the candidate wins.

    Args:
        config: The ``evaluate`` section.
        tracking: The tracking section (finds ``models:/<name>@champion``).
        workdir: Local working directory.
        parent_run_id: MLflow parent run.
        data: The prepared dataset the candidate was evaluated on.
        base_model: The base model the champion's adapter applies to.
        candidate_results: The candidate's evaluation results.
        results: The champion's evaluation results.
        report: Candidate and champion side by side.

    Returns:
        True when the candidate is better than the champion (or there is no champion yet).
    """
    from kubellm.stages import StageContext, evaluate, publish

    ctx = StageContext.from_param(tracking, workdir, parent_run_id)
    out = evaluate.compare_to_champion(config, candidate_results.path, data.path, base_model.path, results.path, ctx)
    publish(out, report=report.path)
    return out.values["passed"]


@component
def select_best(
    evaluations: Input[List[Artifact]],
    adapters: Input[List[Model]],
    metric: str,
    mode: str,
    best_adapter: Output[Model],
    best_evaluation: Output[Artifact],
    report: Output[Markdown],
) -> bool:
    """Pick the sweep's best fine-tune among those that passed the gate.

    Args:
        evaluations: Every trial's evaluation results, in trial order.
        adapters: Every trial's adapter, in the same order.
        metric: The metric that ranks trials (``perplexity``, ``rouge_l`` …).
        mode: ``min`` or ``max``.
        best_adapter: A copy of the winning adapter.
        best_evaluation: A copy of the winner's evaluation results.
        report: Every trial's gate result and metric.

    Returns:
        True when some trial passed the gate (then the best one is registered).
    """
    from kubellm.stages import evaluate, publish

    out = evaluate.select_best(
        [e.path for e in evaluations], [a.path for a in adapters], metric, mode, best_adapter.path, best_evaluation.path
    )
    publish(out, report=report.path)
    return out.values["passed"]
