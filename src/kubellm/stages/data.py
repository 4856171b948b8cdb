"""Data stages: prepare a dataset; ask whether the data changed since the champion was trained."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kubellm import markdown
from kubellm.config import DataConfig
from kubellm.stages.base import StageContext, StageOutput, log, numeric, section
from kubellm.tracking.base import CLOSES_TAG


def prep(config: DataConfig | dict[str, Any], out_dir: str | Path, ctx: StageContext, *, stage: str = "prep",
         tokenizer_dir: str | Path | None = None, source_uri: str | None = None) -> StageOutput:
    """Data preparation. ``source_uri`` replaces the first source's URI (the UI's dataset parameter).

    ``values["fingerprint"]`` is the *data* fingerprint (sources' content and data config, tokenizer
    left out): what a recurring pipeline compares before it trains again (:func:`data_changed`). The
    prepared dataset's own manifest fingerprint also covers the tokenizer. ``values["result"]`` is the
    library's :class:`~kubellm.data.prepare.PrepareResult`.
    """
    from kubellm.data.format import REPORT
    from kubellm.data.prepare import claim_prepared_output, fingerprint, prepare

    cfg = section(DataConfig, config, f"{stage} config")
    if source_uri:
        cfg = cfg.model_copy(deep=True)
        cfg.sources[0].uri = source_uri
    # A refused output folder fails before the MLflow run opens (the library checks again, inputs too).
    claim_prepared_output(cfg, out_dir, tokenizer_dir)
    with ctx.stage(stage, cfg) as tracker:
        res = prepare(cfg, out_dir, tokenizer_dir=tokenizer_dir, tracker=tracker)
        data_fp = res.manifest.fingerprint if tokenizer_dir is None and cfg.tokenizer.path is None else fingerprint(cfg)
        tracker.set_tags({"data_fingerprint": data_fp})
        report = (Path(res.path) / REPORT).read_text(encoding="utf-8")
        link = ctx.run_link(tracker.run_id)
    return StageOutput(numeric(res.stats), link + report, {"fingerprint": data_fp, "result": res})


def data_changed(config: DataConfig | dict[str, Any], ctx: StageContext, *,
                 source_uri: str | None = None) -> StageOutput:
    """Continuous fine-tuning's first question: is there data the champion has not seen?"""
    from kubellm.data.prepare import fingerprint
    from kubellm.tracking.registry import champion_info, model_uri

    cfg = section(DataConfig, config, "instruct_data config")
    if source_uri:
        cfg = cfg.model_copy(deep=True)
        cfg.sources[0].uri = source_uri
    t0 = time.perf_counter()
    with ctx.stage("check_data", cfg) as tracker:
        fp = fingerprint(cfg)
        champ = champion_info(ctx.tracking, ctx.workdir) if ctx.tracking.enabled else None
        seen = (champ.tags or {}).get("data_fingerprint") if champ is not None else None
        changed = fp != seen
        if champ is None:
            why = "no champion yet: training the first one"
        elif changed:
            why = f"data changed since champion v{champ.version} was trained (fingerprint {seen} → {fp})"
        else:
            why = f"data unchanged since champion v{champ.version} was trained (fingerprint {fp}): nothing to do"
        tracker.log_metrics({"data_changed": float(changed)})
        tracker.set_tags({"data_fingerprint": fp, **({} if changed else {CLOSES_TAG: why})})
    log.info(why)
    return StageOutput({"changed": float(changed), "seconds": time.perf_counter() - t0},
                       markdown.section("Data check", why),
                       {"changed": changed, "fingerprint": fp,
                        "champion_uri": model_uri(ctx.tracking.registered_model, alias="champion") if champ else ""})
