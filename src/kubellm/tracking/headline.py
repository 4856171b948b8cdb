"""The parent run tells the story: what a person opening a lifecycle run in the MLflow UI sees first.

When a pipeline ends, its parent run gets the headline of its stages — the evaluation's perplexity, its
ratio to the base and the gate's verdict, the version it registered (linked as the run's output model,
as MLflow 3 shows logged models) and the deployment's status — as metrics and as the run's description
(the ``mlflow.note.content`` tag the UI renders as Markdown). The whole config is one ``config.json``
artifact, not hundreds of params of defaults. Its name says which pipeline, how it ended and when
(:func:`parent_run_name`): MLflow's runs list truncates names, so what tells runs apart comes first.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from kubellm.tracking.base import CLOSES_TAG

#: Metrics of the (last) evaluation stage copied to the parent run, in report order.
HEADLINE_METRICS = (
    "perplexity",
    "base_perplexity",
    "perplexity_ratio",
    "gate_passed",
    "code_parse_rate",
    "rouge_l",
    "token_f1",
)
NOTE_TAG = "mlflow.note.content"
#: The parent run's tag naming the version it registered (``models:/<name>/<version>``).
REGISTERED_TAG = "registered_model"


#: What a parent run's name says before the run has ended.
RUNNING = "running"


def parent_run_name(pipeline: str, start_ms: int, outcome: str = RUNNING) -> str:
    """``lifecycle · v3 champion · 12-07 23:50``: the pipeline (without the ``llm-`` every built-in
    pipeline's name starts with), the outcome, and the start (this machine's local time)."""
    import time

    return f"{_short(pipeline)} · {outcome} · {time.strftime('%m-%d %H:%M', time.localtime(start_ms / 1000))}"


def _short(pipeline: str) -> str:
    return pipeline.removeprefix("llm-") or pipeline


def _outcome(children: list[Any], head: dict[str, Any]) -> str:
    """The end of the story in a few words: the version that became champion, the gate that closed, the
    stage that failed."""
    version = head.get("registered", "").rpartition(" ")[2]  # "kubellm-local v3" → "v3"
    if head["status"] != "FINISHED":
        failed = sorted((c for c in children if c.info.status == "FAILED"), key=lambda c: c.info.start_time or 0)
        where = failed[0].data.tags.get("stage", "") if failed else ""
        return f"{head['status'].lower()}{f' at {where}' if where else ''}"
    if "gate_failure" in head:
        return "gate failed"
    if version and head.get("deployment") in ("promoted", "verified"):
        return f"{version} champion"
    if version:
        return f"{version} registered" + (f", deploy {head['deployment']}" if head.get("deployment") else "")
    return "finished"


def _latest(children: list[Any], stage: str) -> Any | None:
    """The newest finished child run of ``stage`` (sweep trials: ``evaluate.trial-N`` count as evaluate)."""
    runs = [c for c in children if c.data.tags.get("stage", "").split(".")[0] == stage and c.info.status == "FINISHED"]
    return max(runs, key=lambda r: r.info.start_time, default=None)


def write_headline(
    client: Any,
    parent: Any,
    children: list[Any],
    *,
    status: str,
    summary: dict[str, Any] | None = None,
    link_model: bool = True,
) -> dict[str, Any]:
    """Put the stages' headline on ``parent``; returns what was written (for tests and the CLI).
    ``link_model``: also record the registered version's logged model as the run's output (once)."""
    from mlflow.entities import LoggedModelOutput

    run_id = parent.info.run_id
    head: dict[str, Any] = {"status": status}
    metrics: dict[str, float] = {}
    ev = _latest(children, "evaluate")
    if ev is not None:
        metrics.update({k: ev.data.metrics[k] for k in HEADLINE_METRICS if k in ev.data.metrics})
        if CLOSES_TAG in ev.data.tags:
            head["gate_failure"] = ev.data.tags[CLOSES_TAG]
    reg = _latest(children, "register")
    if reg is not None:
        # not the base an adapter version's register step may have registered in the same run
        versions = [
            v
            for v in client.search_model_versions(f"run_id = '{reg.info.run_id}'")
            if (v.tags or {}).get("kind") != "base"
        ]
        if versions:
            mv = max(versions, key=lambda v: int(v.version))
            head["registered"] = f"{mv.name} v{mv.version}"
            # MLflow's "Registered models" box lists the versions whose one run_id is this run; the version's
            # is the register stage's run (whose record it is), so the parent links it in its description
            # and a tag (MLflow has no second run of a version; the logged model below is its other link)
            head["registered_link"] = (
                f"[{head['registered']}](#/models/{quote(mv.name, safe='')}/versions/{mv.version})"
            )
            client.set_tag(run_id, REGISTERED_TAG, f"models:/{mv.name}/{mv.version}")
            metrics["registered_version"] = float(mv.version)
            # The version's logged model (MLflow 3: ``source`` is ``models:/<model id>``; the sqlite store
            # leaves ``model_id`` unset on the version itself).
            model_id = getattr(mv, "model_id", None) or (
                mv.source.removeprefix("models:/") if str(mv.source).startswith("models:/m-") else None
            )
            if model_id and link_model:
                client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
    dep = _latest(children, "deploy")
    if dep is not None:
        head["deployment"] = dep.data.tags.get("deploy.status", "?")
    if metrics:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    head.update(metrics)
    pipeline = parent.data.tags.get("pipeline", "")
    if (parent.info.run_name or "").startswith(f"{_short(pipeline)} · "):
        # a name kubellm gave (KFP's MLflow plugin names its own parent runs): the outcome joins it
        name = parent_run_name(pipeline, parent.info.start_time or 0, _outcome(children, head))
        client.update_run(run_id, name=name)
        head["name"] = name
    client.set_tag(run_id, NOTE_TAG, _note(parent, head, summary or {}))
    return head


def show_reused(client: Any, parent_run_id: str, reused: dict[str, str]) -> dict[str, Any]:
    """A resumed run's parent, once the run is over: the stages it took from earlier runs (``reused``:
    stage → that stage's run id) count as its own for the headline — the reused evaluation's verdict and
    figures, beside the version this run registered — and are linked from the run (``reused.<stage>``
    tags and the description)."""
    parent = client.get_run(parent_run_id)
    runs = {stage: client.get_run(run_id) for stage, run_id in reused.items() if run_id}
    for stage, run in runs.items():
        # a stage of the earlier run counts as finished here: it is what this run used
        run.data.tags.setdefault("stage", stage)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000
    )
    for stage, run in runs.items():
        client.set_tag(parent_run_id, f"reused.{stage}", run.info.run_id)
    return write_headline(
        client,
        parent,
        [*children, *runs.values()],
        status=parent.info.status,
        summary={"reused": {stage: (run.info.experiment_id, run.info.run_id) for stage, run in runs.items()}},
        link_model=False,
    )  # ending the run linked it already


def _note(parent: Any, head: dict[str, Any], summary: dict[str, Any]) -> str:
    from kubellm import markdown

    gate = head.get("gate_passed")
    verdict = (
        "not evaluated"
        if gate is None
        else ("passed" if gate else f"{head.get('gate_failure', 'failed')}: nothing registered")
    )
    ratio = head.get("perplexity_ratio")
    rows = {
        "pipeline": parent.data.tags.get("pipeline", "?"),
        "status": head["status"],
        "held-out perplexity": head.get("perplexity"),
        "ratio to the base": f"{ratio:.3f}" if ratio is not None else None,
        "gate": verdict,
        "registered": head.get("registered_link") or head.get("registered"),
        "deployment": head.get("deployment"),
    }
    if summary.get("error"):
        rows["error"] = str(summary["error"])[:300]
    if summary.get("reused"):
        rows["reused from earlier runs"] = ", ".join(
            f"[{stage}](#/experiments/{exp}/runs/{run_id})" for stage, (exp, run_id) in summary["reused"].items()
        )
    title = head.get("name") or parent.info.run_name or "kubellm run"
    if parent.data.tags.get("run_name"):
        rows = {"run": parent.data.tags["run_name"], **rows}
    return markdown.section(
        title, markdown.fields(rows), "The whole config is the `config.json` artifact; every stage is a nested run."
    )
