"""Training components: fetch a base model, pretrain, LoRA fine-tune."""

from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from kubellm.components._base import component


@component
def fetch_model(ref: str, tracking: dict, workdir: str, model: Output[Model]) -> str:
    """Bring a base model into the pipeline as an artifact (lineage, and one path for every consumer).

    Args:
        ref: A local model directory, a ``models:/name@alias`` registry URI, or a Hugging Face Hub id
            (only where the cluster reaches the Hub). Safetensors weights only.
        tracking: The tracking section (for ``models:/`` URIs).
        workdir: Local working directory.
        model: The model directory (Hugging Face format, or a LoRA adapter with its base recorded).

    Returns:
        What was fetched, for the UI.
    """
    from kubellm.stages import StageContext, train

    return train.fetch_model(ref, model.path, StageContext.from_param(tracking, workdir))


@component
def pretrain(
    config: dict,
    tracking: dict,
    workdir: str,
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
    platform: dict = {},
    run_name: str = "",
) -> None:
    """Pretrain a Llama-architecture model from scratch on a prepared corpus.

    AdamW with warmup and cosine decay, gradient accumulation and clipping, bf16 where the hardware
    runs it natively. Checkpoints every N steps; a retried task resumes from the latest complete
    checkpoint, and SIGTERM (preemption) writes one before exiting.

    Args:
        config: The ``pretrain`` section (``kubellm.config.PretrainConfig``).
        tracking: The tracking section.
        workdir: Local working directory.
        data: A prepared pretraining dataset.
        model: The trained model (Hugging Face format, safetensors, with tokenizer).
        metrics: Steps, final loss, validation loss, tokens/s.
        report: A summary of the run.
        platform: The ``platform`` section, set at compile time; with ``distributed.pretrain.engine`` set
            this step creates a training job (PyTorchJob, TrainJob, RayJob) whose rank 0 logs into
            this step's MLflow run.
        run_name: Names the training job's working directory on the shared volume.
    """
    from kubellm.stages import StageContext, publish, train

    ctx = StageContext.from_param(tracking, workdir)  # the parent run: by KFP run id, outside the cache key
    out = train.pretrain(config, data.path, model.path, ctx, platform=platform or None, run_name=run_name or "kubellm")
    publish(out, report=report.path, metrics=metrics, artifact=model)


@component
def finetune(
    config: dict,
    tracking: dict,
    workdir: str,
    data: Input[Dataset],
    base_model: Input[Model],
    adapter: Output[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
    trial: dict = {},
    platform: dict = {},
    run_name: str = "",
) -> None:
    """LoRA fine-tune a causal LM on prepared instruction data (loss on responses only).

    Same resume and preemption behaviour as pretraining.

    Args:
        config: The ``finetune`` section (``kubellm.config.FinetuneConfig``).
        tracking: The tracking section.
        workdir: Local working directory.
        data: A prepared instruction dataset.
        base_model: The model to adapt.
        adapter: The LoRA adapter (and ``merged/`` when ``merge`` is set).
        metrics: Steps, final loss, validation loss, tokens/s, trainable parameters.
        report: A summary of the run.
        trial: A sweep trial (``{"name", "overrides"}``) whose dotted overrides adjust ``config``.
        platform: The ``platform`` section, set at compile time; with ``distributed.finetune.engine``
            set this step creates a training job whose rank 0 logs into this step's MLflow run.
        run_name: Names the training job's working directory on the shared volume.
    """
    from kubellm.stages import StageContext, publish, train

    ctx = StageContext.from_param(tracking, workdir)  # the parent run: by KFP run id, outside the cache key
    out = train.finetune(
        config,
        base_model.path,
        data.path,
        adapter.path,
        ctx,
        trial=trial or None,
        platform=platform or None,
        run_name=run_name or "kubellm",
    )
    publish(out, report=report.path, metrics=metrics, artifact=adapter)
