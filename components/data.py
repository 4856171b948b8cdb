"""Data components: the data fingerprint and data preparation."""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Output

from kubellm.components._base import component


@component
def check_data(
    config: dict, tracking: dict, workdir: str, parent_run_id: str, source_uri: str, report: Output[Markdown]
) -> bool:
    """Fingerprint the instruction data and compare it with what the current champion was trained on.

    Args:
        config: The ``instruct_data`` section.
        tracking: The tracking section (finds the champion in the Model Registry).
        workdir: Local working directory.
        parent_run_id: MLflow parent run.
        source_uri: Replaces the first source's URI when not empty (the UI's dataset parameter).
        report: The fingerprints compared, and the decision.

    Returns:
        True when the data changed (or there is no champion yet), False when there is nothing new.
    """
    from kubellm.stages import StageContext, data, publish

    ctx = StageContext.from_param(tracking, workdir, parent_run_id)
    out = data.data_changed(config, ctx, source_uri=source_uri or None)
    publish(out, report=report.path)
    return out.values["changed"]


@component
def prepare_data(
    config: dict,
    tracking: dict,
    workdir: str,
    source_uri: str,
    dataset: Output[Dataset],
    report: Output[Markdown],
    metrics: Output[Metrics],
    stage: str = "prep",
    platform: dict = {},
    run_name: str = "",
) -> str:
    """Prepare a pretraining corpus or instruction data with a newly trained (or configured) tokenizer.

    Reads the sources, cleans and de-duplicates, splits train/validation deterministically, trains a
    byte-level BPE tokenizer (or uses ``tokenizer.path``), tokenizes and packs. Counts every dropped
    record by reason.

    Args:
        config: The data section (``kubellm.config.DataConfig``).
        tracking: The tracking section.
        workdir: Local working directory.
        source_uri: Replaces the first source's URI when not empty (the UI's dataset parameter).
        dataset: The prepared dataset directory (Arrow data, tokenizer, stats.json, report.md).
        report: The preparation report.
        metrics: Records in/out, dropped by reason, tokens, blocks, padding fraction.
        stage: Stage name in MLflow (``prep`` or ``prep_instruct``).
        platform: The ``platform`` section, set at compile time; with ``cluster.nodes`` set in ``config``
            this step creates a KubeRay RayJob that prepares on Ray Data across its worker pods (the
            ``prep`` placement, Kueue's labels), whose driver logs into this step's MLflow run, and copies
            the prepared dataset back from the shared volume.
        run_name: Names the RayJob's working directory on the shared volume.

    Returns:
        The data fingerprint (equal fingerprints mean equal data).
    """
    from kubellm.stages import StageContext, data, publish

    ctx = StageContext.from_param(tracking, workdir)  # the parent run: by KFP run id, outside the cache key
    out = data.prep(
        config,
        dataset.path,
        ctx,
        stage=stage,
        source_uri=source_uri or None,
        platform=platform or None,
        run_name=run_name or "kubellm",
    )
    publish(out, report=report.path, metrics=metrics, artifact=dataset)
    return out.values["fingerprint"]


@component
def prepare_instructions(
    config: dict,
    tracking: dict,
    workdir: str,
    source_uri: str,
    tokenizer_from: Input[Artifact],
    dataset: Output[Dataset],
    report: Output[Markdown],
    metrics: Output[Metrics],
    platform: dict = {},
    run_name: str = "",
) -> str:
    """Prepare instruction data with the tokenizer of an upstream dataset or model (one vocabulary).

    Prompt tokens are masked out of the loss; held-out examples are kept for generation metrics.

    Args:
        config: The ``instruct_data`` section (``kubellm.config.DataConfig``, kind ``instruct``).
        tracking: The tracking section.
        workdir: Local working directory.
        source_uri: Replaces the first source's URI when not empty.
        tokenizer_from: A prepared dataset (its ``tokenizer/``) or a model directory with a tokenizer.
        dataset: The prepared instruction dataset.
        report: The preparation report.
        metrics: Preparation statistics.
        platform: The ``platform`` section, set at compile time; with ``cluster.nodes`` set in ``config``
            the preparation runs as a RayJob, as in ``prepare_data`` (the tokenizer is copied to the
            shared volume first).
        run_name: Names the RayJob's working directory on the shared volume.

    Returns:
        The data fingerprint.
    """
    from kubellm.stages import StageContext, data, publish

    ctx = StageContext.from_param(tracking, workdir)  # the parent run: by KFP run id, outside the cache key
    out = data.prep(
        config,
        dataset.path,
        ctx,
        stage="prep_instruct",
        source_uri=source_uri or None,
        tokenizer_dir=tokenizer_from.path,
        platform=platform or None,
        run_name=run_name or "kubellm",
    )
    publish(out, report=report.path, metrics=metrics, artifact=dataset)
    return out.values["fingerprint"]
