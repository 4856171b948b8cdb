"""The summary of one pipeline run, read back from MLflow (the record every stage wrote).

MLflow is the source of truth rather than the orchestrator's own bookkeeping, so the summary is the
same whether the run happened on KFP's local runner or anywhere else that logged to the same store,
and a stage that failed shows up with its error while stages that never ran say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubellm.config import TrackingConfig
from kubellm.errors import KubellmError
from kubellm.fsutil import write_json_atomic

#: Shown for a stage with no MLflow run: it never started (an earlier stage failed, or a gate closed).
NOT_RUN = "not run"
#: Shown for a stage whose outputs a resumed run took from an earlier run instead of running it.
CACHED = "cached"


def collect(cfg: TrackingConfig, workdir: str | Path, *, pipeline: str, run_name: str, stages: list[str],
            wall_seconds: float | None = None, cached: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything a person (or CI) wants to know after a run, as JSON-able data.

    ``cached`` names the stages a resumed run did not run: stage → ``{"from_run": the earlier run,
    "run_id": that stage's MLflow run there}``; their rows say "cached", and their metrics (the
    evaluation's, say) come from the run that made them.
    """
    from kubellm.tracking.kfp_plugin import TAG_KUBELLM_STATUS, handed_experiment_id
    from kubellm.tracking.mlflow_tracker import mlflow_client

    client, uri = mlflow_client(cfg, workdir)
    exp = client.get_experiment_by_name(cfg.experiment)
    experiments = [e for e in (exp.experiment_id if exp else None, handed_experiment_id()) if e]
    # a run under KFP's MLflow plugin: its parent is the plugin's, named by the plugin, tagged by kubellm
    parents = [] if not experiments else client.search_runs(
        experiments,
        filter_string=f"tags.run_kind = 'parent' and tags.pipeline = '{pipeline}' and attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1) or client.search_runs(
        experiments, filter_string=f"tags.run_kind = 'parent' and tags.pipeline = '{pipeline}' and "
                                   f"tags.kfp_run_id = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise KubellmError(f"no MLflow parent run named {run_name!r} for pipeline {pipeline} in {uri} "
                           "(the run failed before its first task; see the log above)")
    parent = parents[0]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=1000)
    by_stage: dict[str, Any] = {}
    for child in sorted(children, key=lambda r: r.info.start_time or 0):
        if "stage" in child.data.tags:  # the plugin also nests a run for tasks that log no stage
            by_stage[child.data.tags["stage"]] = child
    reused = {s: c for s, c in (cached or {}).items() if s not in by_stage}
    for stage, origin in reused.items():
        if origin.get("run_id"):
            by_stage[stage] = client.get_run(origin["run_id"])

    # "finetune.*" in the stage list stands for every trial of a sweep (finetune.trial-1, …).
    ordered: list[str] = []
    for name in stages:
        if name.endswith(".*"):
            ordered += sorted(s for s in by_stage if s.startswith(name[:-1])) or [name[:-2]]
        else:
            ordered.append(name)
    ordered += sorted(s for s in by_stage if s not in ordered)
    rows, failed = [], None
    for stage in ordered:
        run = by_stage.get(stage)
        if stage in reused:
            rows.append({"stage": stage, "status": CACHED, "seconds": None, "run_id": run.info.run_id if run else None,
                         "cached_from": reused[stage]["from_run"]})
            continue
        if run is None:
            rows.append({"stage": stage, "status": NOT_RUN, "seconds": None})
            continue
        end = run.info.end_time or run.info.start_time
        row = {"stage": stage, "status": run.info.status, "seconds": round((end - run.info.start_time) / 1000, 2),
               "run_id": run.info.run_id}
        if "error" in run.data.tags:
            row["error"] = run.data.tags["error"]
            failed = failed or stage
        rows.append(row)

    evaluation = by_stage.get("evaluate")
    metrics = dict(evaluation.data.metrics) if evaluation is not None else {}
    summary: dict[str, Any] = {
        "pipeline": pipeline,
        "run_name": run_name,
        "status": parent.data.tags.get(TAG_KUBELLM_STATUS) or parent.info.status,
        "failed_stage": failed,
        "wall_seconds": round(wall_seconds, 2) if wall_seconds is not None else None,
        "stages": rows,
        "evaluation": {"metrics": metrics,
                       "gate_passed": None if "gate_passed" not in metrics else bool(metrics["gate_passed"])},
        "mlflow": {"tracking_uri": uri, "experiment": cfg.experiment, "parent_run_id": parent.info.run_id},
        "model": _registered(client, cfg.registered_model, by_stage.get("register")),
        "deployment": _deployment(by_stage.get("deploy")),
    }
    return summary


def _registered(client: Any, name: str, register_run: Any) -> dict[str, Any] | None:
    if register_run is None:
        return None
    versions = client.search_model_versions(f"run_id = '{register_run.info.run_id}'")
    if not versions:
        return None
    mv = client.get_model_version(name, max(versions, key=lambda v: int(v.version)).version)
    return {"name": mv.name, "version": int(mv.version), "aliases": sorted(mv.aliases or [])}


def _deployment(deploy_run: Any) -> dict[str, Any] | None:
    if deploy_run is None:
        return None
    tags = deploy_run.data.tags
    out = {"status": tags.get("deploy.status"), "endpoint": tags.get("deploy.endpoint"),
           "manifests": tags.get("deploy.manifests"), "detail": tags.get("deploy.detail")}
    if tags.get("playground.manifests"):  # the deploy step creates the playground after a healthy rollout
        out["playground_manifests"] = tags["playground.manifests"]
    return out


def add_failed_tasks(summary: dict[str, Any], failed_tasks: list[dict[str, Any]]) -> None:
    """Add what the runner saw fail: a task that failed before opening its MLflow run (a refused
    parameter, say) leaves no error in MLflow, so its row would otherwise read "not run"."""
    summary["failed_tasks"] = failed_tasks
    for task in failed_tasks:
        row = next((r for r in summary["stages"] if r["stage"] == task["stage"] and r["status"] == NOT_RUN), None)
        if row is not None:
            row.update(status="FAILED", error=task["error"] or f"see {task['log']}")
        summary["failed_stage"] = summary["failed_stage"] or task["stage"]


def write(summary: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "summary.json"
    write_json_atomic(path, summary)
    return path


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-stage table ``kubellm run`` prints."""
    return [{"stage": r["stage"], "status": r["status"],
             "seconds": "" if r["seconds"] is None else f"{r['seconds']:.1f}",
             "note": (r.get("error") or (f"outputs of {r['cached_from']}" if r.get("cached_from") else ""))[:100]}
            for r in summary["stages"]]


def headline(summary: dict[str, Any]) -> str:
    ev, model = summary["evaluation"], summary.get("model")
    parts = [f"{summary['pipeline']} {summary['run_name']}: {summary['status']}"]
    if summary.get("failed_stage"):
        parts.append(f"failed at {summary['failed_stage']}")
    if ev["gate_passed"] is not None:
        m = ev["metrics"]
        figures = []
        if m.get("perplexity") and m.get("base_perplexity"):
            figures.append(f"perplexity {m['perplexity']:.3g} vs base {m['base_perplexity']:.3g}")
        if m.get("code_parse_rate") is not None and m.get("base_code_parse_rate") is not None:
            figures.append(f"answers that are Python code {m['code_parse_rate']:.0%} vs base "
                           f"{m['base_code_parse_rate']:.0%}")
        parts.append(f"gate {'passed' if ev['gate_passed'] else 'failed'}"
                     + (f" ({'; '.join(figures)})" if figures else ""))
    if model:
        parts.append(f"model {model['name']} v{model['version']} [{', '.join(model['aliases'])}]")
    return "; ".join(parts)

