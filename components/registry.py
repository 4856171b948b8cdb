"""Registry component: log and register the candidate model."""

from kfp.dsl import Artifact, Input, Markdown, Model, Output

from kubellm.components._base import component


@component
def register(
    tracking: dict,
    workdir: str,
    parent_run_id: str,
    model: Input[Model],
    base_model: Input[Model],
    evaluation: Input[Artifact],
    data_fingerprint: str,
    report: Output[Markdown],
) -> str:
    """Log the model with MLflow and register a new version with the alias ``candidate``: a LoRA adapter
    as an adapter version recording its base version (the base registered once, as ``<name>-base``), or
    merged into its base with ``tracking.register_merged`` (a runtime that cannot load adapters).

    Runs only after the promotion gate passed. ``champion`` is set later, by the deploy step, once the
    new version serves healthy traffic.

    Args:
        tracking: The tracking section (registered model name).
        workdir: Local working directory.
        parent_run_id: MLflow parent run.
        model: The candidate (full model or LoRA adapter).
        base_model: Its base model (recorded with an adapter).
        evaluation: The evaluation results (metrics.json), stored with the version.
        data_fingerprint: Fingerprint of the training data, stored as a version tag.
        report: Name, version, aliases and URI of the registered version.

    Returns:
        The registry URI of the new version (``models:/name/version``).
    """
    from kubellm.stages import StageContext, publish, registry

    ctx = StageContext.from_param(tracking, workdir, parent_run_id)
    out = registry.register(
        model.path, ctx, base_model=base_model.path, evaluation_dir=evaluation.path, data_fingerprint=data_fingerprint
    )
    publish(out, report=report.path)
    return out.values["uri"]
