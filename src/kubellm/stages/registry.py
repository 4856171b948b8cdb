"""Registry stages: register a trained model (alias ``candidate``); resolve ``models:/`` URIs."""

from __future__ import annotations

from pathlib import Path

from kubellm import markdown
from kubellm.stages.base import StageContext, StageOutput


def register(model_dir: str | Path, ctx: StageContext, *, base_model: str | Path | None = None,
             evaluation_dir: str | Path | None = None, data_fingerprint: str | None = None) -> StageOutput:
    """Log and register the model; the new version gets the ``candidate`` alias. The evaluation's
    metrics (``evaluation_dir``) are logged with the version."""
    from kubellm.tracking.registry import register_model
    from kubellm.train.evaluate import EvalResult

    metrics = EvalResult.read(evaluation_dir).metrics if evaluation_dir else {}
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    with ctx.stage("register") as tracker:
        tags = {"data_fingerprint": data_fingerprint} if data_fingerprint else None
        info = register_model(ctx.tracking, ctx.workdir, model_dir, run_id=tracker.run_id or "",
                              base_model=str(base_model) if base_model else None, metrics=metrics, tags=tags)
        tracker.log_metrics({"registered_version": float(info.version)})
    report = markdown.section("Registered model", ctx.run_link(tracker.run_id),
                              markdown.table(["name", "version", "aliases", "uri"],
                                             [(info.name, info.version, info.aliases, info.uri)]))
    return StageOutput({"version": float(info.version)}, report,
                       {"name": info.name, "version": info.version, "uri": info.uri, "info": info})


def resolve_model(uri: str, ctx: StageContext) -> str:
    """A local directory for ``models:/…`` URIs (downloaded from the registry); other refs unchanged."""
    if not uri.startswith("models:/"):
        return uri
    from kubellm.tracking.registry import resolve_model_uri

    return str(resolve_model_uri(ctx.tracking, ctx.workdir, uri))
