"""Evaluation component: held-out metrics, base vs candidate, and the promotion gate."""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from kubellm.components._base import component


@component
def evaluate(config: dict, tracking: dict, workdir: str, parent_run_id: str, data: Input[Dataset],
             model: Input[Model], base_model: Input[Model], results: Output[Artifact],
             metrics: Output[Metrics], report: Output[Markdown]) -> bool:
    """Evaluate a candidate against its base model and apply the promotion gate.

    Held-out perplexity (token-weighted, same masking as training) for both models, and for
    instruction data greedy generations scored by exact match, token F1 and ROUGE-L, side by side.

    Args:
        config: The ``evaluate`` section (``kubellm.config.EvalConfig``, gate rules included).
        tracking: The tracking section.
        workdir: Local working directory.
        parent_run_id: MLflow parent run.
        data: The prepared dataset whose validation split and held-out prompts are used.
        model: The candidate (a full model or a LoRA adapter).
        base_model: The model the candidate is compared with.
        results: metrics.json, report.md and loss_curve.png.
        metrics: The evaluation metrics and ``gate_passed``.
        report: Metrics tables, gate rules and sample generations.

    Returns:
        Whether the promotion gate passed.
    """
    from kubellm import stages

    trk = stages.Tracking.from_param(tracking, workdir, parent_run_id)
    out = stages.evaluate(config, model.path, data.path, results.path, trk, base_model=base_model.path)
    stages.publish(out, report=report.path, metrics=metrics, artifact=results)
    return out.values["passed"]
