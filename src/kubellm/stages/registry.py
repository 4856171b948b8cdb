"""Registry stages: register a trained model (alias ``candidate``); resolve ``models:/`` URIs.

A LoRA fine-tune with a local base is registered as an *adapter version* (the adapter's files and the
base version it belongs to, :func:`kubellm.tracking.registry.register_adapter`), unless
``tracking.register_merged`` asks for the adapter merged into its base (a runtime that cannot load an
adapter: see :meth:`kubellm.config.RunConfig.merged_versions`). The step reports the storage per version
either way: the version's bytes beside what a merged copy stores (the base's weights: merging keeps every
tensor's shape).
"""

from __future__ import annotations

from pathlib import Path

from kubellm import markdown
from kubellm.stages.base import StageContext, StageOutput


def register(
    model_dir: str | Path,
    ctx: StageContext,
    *,
    base_model: str | Path | None = None,
    evaluation_dir: str | Path | None = None,
    data_fingerprint: str | None = None,
) -> StageOutput:
    """Log and register the model; the new version gets the ``candidate`` alias. The evaluation's
    metrics (``evaluation_dir``) are logged with the version."""
    from kubellm.evaluate.run import EvalResult
    from kubellm.models.causal_lm import is_adapter_dir
    from kubellm.tracking.registry import register_adapter, register_model, storage_figures, storage_line

    metrics = EvalResult.read(evaluation_dir).metrics if evaluation_dir else {}
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    as_adapter = (
        not ctx.tracking.register_merged
        and base_model is not None
        and Path(base_model).is_dir()
        and is_adapter_dir(model_dir)
    )
    with ctx.stage("register") as tracker:
        tags = {"data_fingerprint": data_fingerprint} if data_fingerprint else None
        run_id = tracker.run_id or ""
        if as_adapter:
            info = register_adapter(
                ctx.tracking,
                ctx.workdir,
                model_dir,
                run_id=run_id,
                base_model=str(base_model),
                metrics=metrics,
                tags=tags,
            )
        else:
            info = register_model(
                ctx.tracking,
                ctx.workdir,
                model_dir,
                run_id=run_id,
                base_model=str(base_model) if base_model else None,
                metrics=metrics,
                tags=tags,
            )
        storage = storage_figures(info.tags)
        tracker.log_metrics(
            {
                "registered_version": float(info.version),
                **{k: float(v) for k, v in storage.items() if isinstance(v, int | float)},
            }
        )
    row = (info.name, info.version, info.aliases, info.uri, storage.get("kind", "merged"), storage_line(storage) or "-")
    report = markdown.section(
        "Registered model",
        ctx.run_link(tracker.run_id),
        markdown.table(["name", "version", "aliases", "uri", "kind", "storage"], [row]),
    )
    return StageOutput(
        {"version": float(info.version)},
        report,
        {"name": info.name, "version": info.version, "uri": info.uri, "info": info, "storage": storage},
    )


def resolve_model(uri: str, ctx: StageContext) -> str:
    """A local directory for ``models:/…`` URIs (downloaded from the registry); other refs unchanged."""
    if not uri.startswith("models:/"):
        return uri
    from kubellm.tracking.registry import resolve_model_uri

    return str(resolve_model_uri(ctx.tracking, ctx.workdir, uri))
