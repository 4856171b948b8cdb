"""The summary of one pipeline run, read back from MLflow (the record every stage wrote).

MLflow is the source of truth rather than the orchestrator's own bookkeeping, so the summary is the
same whether the run happened on KFP's local runner or anywhere else that logged to the same store,
and a stage that failed shows up with its error while stages that never ran say so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubellm.config import TrackingConfig
from kubellm.errors import KubellmError
from kubellm.fsutil import write_json_atomic
from kubellm.tracking.base import CLOSES_TAG, GATE_RULES_TAG

#: Shown for a stage with no MLflow run: it never started (an earlier stage failed, or a gate closed).
NOT_RUN = "not run"
#: Shown for a stage whose outputs a resumed run took from an earlier run instead of running it.
CACHED = "cached"


def collect(
    cfg: TrackingConfig,
    workdir: str | Path,
    *,
    pipeline: str,
    run_name: str,
    stages: list[str],
    wall_seconds: float | None = None,
    cached: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything a person (or CI) wants to know after a run, as JSON-able data.

    ``cached`` names the stages a resumed run did not run: stage → ``{"from_run": the earlier run,
    "run_id": that stage's MLflow run there}``; their rows say "cached", and their metrics (the
    evaluation's, say) come from the run that made them.
    """
    from kubellm.tracking.connect import mlflow_client
    from kubellm.tracking.kfp_plugin import TAG_KUBELLM_STATUS, handed_experiment_id

    client, uri = mlflow_client(cfg, workdir)
    exp = client.get_experiment_by_name(cfg.experiment)
    experiments = [e for e in (exp.experiment_id if exp else None, handed_experiment_id()) if e]
    # the parent by the run's name (its run_name tag; under KFP's MLflow plugin the plugin's parent, tagged by
    # kubellm), else by KFP run id, else by MLflow name (parent runs made before the run_name tag)
    parents: list[Any] = []
    for key in ("tags.run_name", "tags.kfp_run_id", "attributes.run_name"):
        if experiments and not parents:
            parents = client.search_runs(
                experiments,
                filter_string=f"tags.run_kind = 'parent' and tags.pipeline = '{pipeline}' and {key} = '{run_name}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
    if not parents:
        raise KubellmError(
            f"no MLflow parent run named {run_name!r} for pipeline {pipeline} in {uri} "
            "(the run failed before its first task; see the log above)"
        )
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        max_results=1000,
    )
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
    closed = _closed_by([by_stage[s] for s in ordered if s in by_stage])
    for stage in ordered:
        run = by_stage.get(stage)
        if stage in reused:
            rows.append(
                {
                    "stage": stage,
                    "status": CACHED,
                    "seconds": None,
                    "run_id": run.info.run_id if run else None,
                    "cached_from": reused[stage]["from_run"],
                }
            )
            continue
        if run is None:
            reason = f"{failed} failed" if failed else closed
            rows.append({"stage": stage, "status": NOT_RUN, "seconds": None, **({"reason": reason} if reason else {})})
            continue
        end = run.info.end_time or run.info.start_time
        row = {
            "stage": stage,
            "status": run.info.status,
            "seconds": round((end - run.info.start_time) / 1000, 2),
            "run_id": run.info.run_id,
        }
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
        "evaluation": {
            "metrics": metrics,
            "gate_passed": None if "gate_passed" not in metrics else bool(metrics["gate_passed"]),
            "rules": _gate_rules(evaluation),
            "gate_failure": evaluation.data.tags.get(CLOSES_TAG) if evaluation is not None else None,
        },
        "closed_by": closed,
        "mlflow": {
            "tracking_uri": uri,
            "experiment": cfg.experiment,
            "experiment_id": parent.info.experiment_id,
            "parent_run_id": parent.info.run_id,
        },
        "model": _registered(client, cfg.registered_model, by_stage.get("register")),
        "deployment": _deployment(by_stage.get("deploy")),
    }
    return summary


def _closed_by(runs: list[Any]) -> str | None:
    """Why the stages after a closing one did not run: the first stage that said so (the data check, the
    gate); in a sweep, every trial's gate failing."""
    reasons = [(r.data.tags.get("stage", ""), r.data.tags[CLOSES_TAG]) for r in runs if CLOSES_TAG in r.data.tags]
    own = [why for stage, why in reasons if ".trial-" not in stage]
    if own:
        return own[0]
    trials = [r for r in runs if ".trial-" in r.data.tags.get("stage", "") and "gate_passed" in r.data.metrics]
    if trials and not any(r.data.metrics["gate_passed"] for r in trials):
        return "no trial passed the gate (" + "; ".join(f"{stage}: {why}" for stage, why in reasons) + ")"
    return None


def _gate_rules(evaluation: Any) -> list[dict[str, Any]]:
    """The gate's rules as the evaluation recorded them (empty for a run from before they were)."""
    raw = evaluation.data.tags.get(GATE_RULES_TAG) if evaluation is not None else None
    try:
        rules = json.loads(raw) if raw else []
    except ValueError:  # cut at MLflow's tag length: the report still has them all
        return []
    return rules if isinstance(rules, list) else []


def _registered(client: Any, name: str, register_run: Any) -> dict[str, Any] | None:
    if register_run is None:
        return None
    # the run's version of ``name``, not the base an adapter version's step may have registered with it
    versions = [v for v in client.search_model_versions(f"run_id = '{register_run.info.run_id}'") if v.name == name]
    if not versions:
        return None
    from kubellm.tracking.registry import storage_figures

    mv = client.get_model_version(name, max(versions, key=lambda v: int(v.version)).version)
    # what the version stores: an adapter version's bytes beside a merged copy's (storage_factor)
    return {
        "name": mv.name,
        "version": int(mv.version),
        "aliases": sorted(mv.aliases or []),
        **storage_figures(dict(mv.tags or {})),
    }


def _deployment(deploy_run: Any) -> dict[str, Any] | None:
    if deploy_run is None:
        return None
    tags = deploy_run.data.tags
    out = {
        "status": tags.get("deploy.status"),
        "endpoint": tags.get("deploy.endpoint"),
        "manifests": tags.get("deploy.manifests"),
        "detail": tags.get("deploy.detail"),
    }
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


def show_reused(cfg: TrackingConfig, workdir: str | Path, summary: dict[str, Any]) -> None:
    """On a resumed run's MLflow parent, the stages it reused: the reused evaluation's verdict and figures
    in its headline, and links to the runs that made them (:func:`kubellm.tracking.headline.show_reused`)."""
    reused = {r["stage"]: r["run_id"] for r in summary["stages"] if r["status"] == CACHED and r.get("run_id")}
    if not reused:
        return
    from kubellm.tracking.connect import mlflow_client, mlflow_errors
    from kubellm.tracking.headline import show_reused as annotate

    client, uri = mlflow_client(cfg, workdir)
    try:
        with mlflow_errors(uri, "linking the reused stages from the parent run"):
            annotate(client, summary["mlflow"]["parent_run_id"], reused)
    except KubellmError as err:  # the run itself is done and recorded: this is its description only
        from kubellm.log import get_logger

        get_logger("run").warning("%s", err)


def add_task_states(summary: dict[str, Any], tasks: dict[str, str], stage_of: Any) -> None:
    """A step that logs no MLflow run of its own (a user's component, say) but that the runner saw finish
    reads "FINISHED" with a note, not "not run". ``stage_of``: task label → its row's stage."""
    done = {stage_of(label) for label, state in tasks.items() if state == "done"}
    for row in summary["stages"]:
        if row["status"] == NOT_RUN and row["stage"] in done:
            row.pop("reason", None)
            row.update(status="FINISHED", note="no MLflow run of its own")


def write(summary: dict[str, Any], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "summary.json"
    write_json_atomic(path, summary)
    return path


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-stage table ``kubellm run`` prints."""
    return [
        {
            "stage": r["stage"],
            "status": r["status"],
            "seconds": "" if r["seconds"] is None else f"{r['seconds']:.1f}",
            "note": (
                r.get("error")
                or (f"outputs of {r['cached_from']}" if r.get("cached_from") else "")
                or r.get("reason")
                or r.get("note")
                or ""
            )[:100],
        }
        for r in summary["stages"]
    ]


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
            figures.append(
                f"answers that are Python code {m['code_parse_rate']:.0%} vs base {m['base_code_parse_rate']:.0%}"
            )
        if ev["gate_passed"]:
            parts.append("gate passed" + (f" ({'; '.join(figures)})" if figures else ""))
        else:  # the failed rules first: a better perplexity beside "failed" reads as a contradiction
            parts += [ev.get("gate_failure") or "gate failed", *figures]
    elif summary.get("closed_by"):
        parts.append(summary["closed_by"])
    if model:
        from kubellm.tracking.registry import storage_line

        stored = storage_line(model)
        parts.append(
            f"model {model['name']} v{model['version']} [{', '.join(model['aliases'])}]"
            + (f": {stored}" if stored else "")
        )
    return "; ".join(parts)


def run_page(experiment_id: str | None, run_id: str | None) -> str:
    """The MLflow UI's page of a run (``#/…``), in its model-training view: MLflow 3's UI otherwise opens
    in its GenAI view, whose experiment page shows traces and no runs."""
    if not experiment_id or not run_id:
        return ""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def next_steps(summary: dict[str, Any], config_arg: str | None = None) -> list[str]:
    """What a person does after a run, as commands that work for a ``pip install``ed kubellm: open the run
    in MLflow, serve the version it registered."""
    mlflow, lines = summary["mlflow"], []
    uri, parent = str(mlflow["tracking_uri"]), mlflow.get("parent_run_id")
    page = run_page(mlflow.get("experiment_id"), parent)
    if uri.startswith("sqlite:///"):
        lines.append(f"MLflow: mlflow ui --backend-store-uri {uri} --port 5000, then http://127.0.0.1:5000/{page}")
    elif uri.startswith(("http://", "https://")) and page:
        lines.append(f"MLflow: {uri.rstrip('/')}/{page}")
    else:
        lines.append(f"MLflow: {uri} (experiment {mlflow['experiment']})")
    model = summary.get("model")
    if model:
        config = f" --config {config_arg}" if config_arg else ""
        lines.append(f"serve it: kubellm serve{config} --model models:/{model['name']}/{model['version']}")
    return lines
