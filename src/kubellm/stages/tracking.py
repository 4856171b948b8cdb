"""The pipeline's MLflow parent run: started by its first task, ended by its exit handler."""

from __future__ import annotations

from typing import Any

from kubellm.config import RunConfig, TrackingConfig
from kubellm.stages.base import section


def start_run(
    run_config: dict[str, Any], tracking: dict[str, Any], workdir: str, *, pipeline: str, run_name: str, kfp_run_id: str
) -> str:
    """Create (or, for a retried task, re-attach to) the MLflow parent run; returns its id (``""`` with
    tracking off)."""
    cfg_tracking = section(TrackingConfig, tracking, "tracking config")
    if not cfg_tracking.enabled:
        return ""
    from kubellm.tracking.runs import start_parent_run

    cfg = section(RunConfig, run_config, "run config")
    return start_parent_run(
        cfg_tracking,
        workdir,
        pipeline=pipeline,
        run_name=run_name,
        config=cfg.model_dump(mode="json"),
        tags={"kfp_run_id": kfp_run_id, "config_hash": cfg.config_hash()},
    )


def finish_run(
    tracking: dict[str, Any],
    workdir: str,
    *,
    pipeline: str,
    run_name: str,
    kfp_run_id: str,
    state: str,
    error: str | None = None,
) -> str:
    """Record the pipeline's final state on its parent run (the exit handler's one job)."""
    cfg_tracking = section(TrackingConfig, tracking, "tracking config")
    if not cfg_tracking.enabled:
        return state
    from kubellm.tracking.runs import end_parent_run, start_parent_run

    run_id = start_parent_run(
        cfg_tracking, workdir, pipeline=pipeline, run_name=run_name, config={}, tags={"kfp_run_id": kfp_run_id}
    )
    status = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED", "CANCELED": "KILLED"}.get(state, "FAILED")
    end_parent_run(cfg_tracking, workdir, run_id, status, summary={"kfp_state": state, "error": error or ""})
    return status
