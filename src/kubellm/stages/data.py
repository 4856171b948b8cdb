"""Data stages: prepare a dataset; ask whether the data changed since the champion was trained.

Preparation runs in this process (``engine: local``, or ``engine: ray`` on a local Ray or the cluster
``RAY_ADDRESS`` names) or — with ``<section>.cluster.nodes`` set — as a KubeRay RayJob, launched and
waited for as the training engines' jobs are (:mod:`kubellm.k8s.rayjob`, launched by
:mod:`kubellm.k8s.training_job`): the step copies a reused tokenizer to the shared PVC, the job's driver prepares on
Ray Data into the PVC and logs into this
step's MLflow run, and the step copies the prepared dataset back as its artifact.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from kubellm import markdown
from kubellm.config import DataConfig, PlatformConfig
from kubellm.errors import ConfigError
from kubellm.stages.base import StageContext, StageOutput, log, numeric, section
from kubellm.tracking.base import CLOSES_TAG, Tracker


def prep(
    config: DataConfig | dict[str, Any],
    out_dir: str | Path,
    ctx: StageContext,
    *,
    stage: str = "prep",
    tokenizer_dir: str | Path | None = None,
    source_uri: str | None = None,
    platform: PlatformConfig | dict[str, Any] | None = None,
    run_name: str = "kubellm",
) -> StageOutput:
    """Data preparation. ``source_uri`` replaces the first source's URI (the UI's dataset parameter).

    With ``cluster.nodes > 0`` the preparation runs as a prep RayJob (``platform``: its placement, image,
    namespace and queue; ``run_name`` names its folder on the shared volume).

    ``values["fingerprint"]`` is the *data* fingerprint (sources' content and data config, tokenizer
    left out): what a recurring pipeline compares before it trains again (:func:`data_changed`). The
    prepared dataset's own manifest fingerprint also covers the tokenizer. ``values["result"]`` is the
    library's :class:`~kubellm.data.prepare.PrepareResult`.
    """
    from kubellm.data.format import REPORT
    from kubellm.data.prepare import OUTPUT_KIND, claim_prepared_output, fingerprint, prepare
    from kubellm.fsutil import claim_output

    cfg = section(DataConfig, config, f"{stage} config")
    if source_uri:
        cfg = cfg.model_copy(deep=True)
        cfg.sources[0].uri = source_uri
    as_job = cfg.cluster.nodes > 0
    if as_job and not platform:
        raise ConfigError(
            f"{stage}: cluster.nodes = {cfg.cluster.nodes} prepares in a RayJob, which takes its image, "
            f"namespace and placement from the platform section; none was given to this step"
        )
    place = section(PlatformConfig, platform, "platform config") if as_job else None
    # A refused output folder fails before the MLflow run opens (the library checks again, inputs too);
    # a RayJob's sources are read on its cluster only.
    if as_job:
        claim_output(out_dir, OUTPUT_KIND)
    else:
        claim_prepared_output(cfg, out_dir, tokenizer_dir)
    with ctx.stage(stage, cfg) as tracker:
        if as_job:
            res = _as_job(cfg, stage, place, ctx, tracker, run_name, out_dir, tokenizer_dir)
        else:
            res = prepare(cfg, out_dir, tokenizer_dir=tokenizer_dir, tracker=tracker)
        data_fp = res.manifest.fingerprint if tokenizer_dir is None and cfg.tokenizer.path is None else fingerprint(cfg)
        tracker.set_tags({"data_fingerprint": data_fp})
        report = (Path(res.path) / REPORT).read_text(encoding="utf-8")
        link = ctx.run_link(tracker.run_id)
    return StageOutput(numeric(res.stats), link + report, {"fingerprint": data_fp, "result": res})


def _as_job(
    cfg: DataConfig,
    stage: str,
    platform: PlatformConfig,
    ctx: StageContext,
    tracker: Tracker,
    run_name: str,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None,
) -> Any:
    """Prepare in the prep RayJob: the tokenizer to the shared volume, the job, the dataset back."""
    import hashlib
    import json
    import shutil

    from kubellm.data.format import open_prepared
    from kubellm.data.prepare import OUTPUT_KIND, PrepResult
    from kubellm.fsutil import atomic_dir
    from kubellm.k8s.jobspec import SHARED_MOUNT
    from kubellm.k8s.shared_volume import stage_prep
    from kubellm.k8s.training_job import run_prep_rayjob
    from kubellm.stages.base import KFP_RUN_ENV, job_env, job_run_config

    name = "data" if cfg.kind == "pretrain" else "instruct_data"
    key = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    shared_out, shared_tok = stage_prep(SHARED_MOUNT, run_name, stage, key, tokenizer_dir)
    run_cfg = job_run_config(ctx, platform, stage, run_name, **{name: cfg})
    job, outcome = run_prep_rayjob(
        run_cfg,
        name,
        str(shared_out),
        str(shared_tok) if shared_tok else None,
        run_key=os.environ.get(KFP_RUN_ENV) or None,
        env=job_env(tracker),
    )
    tracker.set_tags(
        {f"{stage}.job": f"{outcome.kind}/{outcome.name}", f"{stage}.job_restarted": str(outcome.restarted)}
    )
    log.info("%s: prepared by %s/%s in %s", stage, outcome.namespace, outcome.name, shared_out)
    ds = open_prepared(shared_out)  # the manifest written last: a job that reported success but left none fails here
    with atomic_dir(out_dir, OUTPUT_KIND) as tmp:
        shutil.copytree(shared_out, tmp, dirs_exist_ok=True)
    return PrepResult(Path(out_dir), ds.manifest, ds.stats())


def data_changed(
    config: DataConfig | dict[str, Any], ctx: StageContext, *, source_uri: str | None = None
) -> StageOutput:
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
    return StageOutput(
        {"changed": float(changed), "seconds": time.perf_counter() - t0},
        markdown.section("Data check", why),
        {
            "changed": changed,
            "fingerprint": fp,
            "champion_uri": model_uri(ctx.tracking.registered_model, alias="champion") if champ else "",
        },
    )
