"""KFP's MLflow plugin, obeyed: a step handed ``MLFLOW_RUN_ID`` logs into that run and opens none.

Against a real ``mlflow server``, with the runs made the way the plugin makes them
(:mod:`mlflow_plugin`): a stage command started with MLflow's own variables, and a whole local lifecycle
run with the variables handed per task — one tree, nothing duplicated, nothing left RUNNING, a retried
run re-attaching to the same runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LOOP = {
    "max_steps": 8,
    "log_every": 2,
    "checkpoint_every": 4,
    "micro_batch_size": 2,
    "precision": "fp32",
    "eval_every": 1000,
}
SETS = [a for k, v in LOOP.items() for a in ("--set", f"pretrain.loop.{k}={v}")]


def _all_runs(client, *experiment_ids: str) -> list:
    return list(client.search_runs(list(experiment_ids), max_results=1000))


@pytest.mark.slow
@pytest.mark.integration
def test_a_stage_command_handed_mlflow_run_id_logs_into_that_run_and_opens_no_other(
    corpus: Path, tmp_path: Path, mlflow_server: str
) -> None:
    """`kubellm pretrain` with MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID and MLFLOW_RUN_ID set, as
    MLflow's own clients honour them (the plugin's nested run of a task): params, per-step metrics,
    artifacts and tags land in that run; no run appears in kubellm's experiment or the plugin's; run
    again (a retried task), it re-attaches without repeating a step; the config's tracking.uri, pointing
    elsewhere, does not split the run."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.create_experiment(f"plugin-cli-{tmp_path.name}")
    parent = client.create_run(exp, run_name="kfp-run").info.run_id
    task = client.create_run(exp, run_name="pretrain", tags={"mlflow.parentRunId": parent}).info.run_id
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_EXPERIMENT_ID": exp,
        "MLFLOW_RUN_ID": task,
    }
    cmd = [
        str(BIN / "kubellm"),
        "pretrain",
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "out"),
        *SETS,
        "--set",
        f"tracking.experiment=kubellm-{tmp_path.name}",
        "--set",
        f"tracking.uri=sqlite:///{tmp_path / 'elsewhere.db'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = _all_runs(client, exp)
    assert sorted(r.info.run_id for r in runs) == sorted([parent, task])  # nothing opened beside them
    assert client.get_experiment_by_name(f"kubellm-{tmp_path.name}") is None
    assert not (tmp_path / "elsewhere.db").exists()
    run = client.get_run(task)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["run_kind"] == "stage"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["loop.max_steps"] == "8"
    steps = sorted(m.step for m in client.get_metric_history(task, "loss"))
    assert steps and steps == sorted(set(steps)) and steps[-1] == 8
    assert "config.json" in {a.path for a in client.list_artifacts(task)}
    assert client.get_run(parent).info.status == "RUNNING"  # the plugin's to close, not kubellm's

    # the retried task (a new pod: a fresh output folder): the plugin reopens the same run; the stage
    # re-attaches and the steps it trains again are not logged twice
    client.update_run(task, status="RUNNING")
    retry = [str(tmp_path / "retry") if a == str(tmp_path / "out") else a for a in cmd]
    proc = subprocess.run(retry, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(r.info.run_id for r in _all_runs(client, exp)) == sorted([parent, task])
    run = client.get_run(task)
    assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2"
    assert sorted(m.step for m in client.get_metric_history(task, "loss")) == steps


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1200)  # two lifecycle runs (the second resumed) on two busy cores
def test_a_local_run_under_the_plugin_is_one_tree_with_the_headline_on_the_plugins_parent(
    tmp_path: Path, mlflow_server: str
) -> None:
    """`kubellm run` with the plugin's variables handed per task: the plugin's parent and exactly one run
    per task, every stage's metrics in its task's run, the headline on the plugin's parent, the registered
    version's source run inside the tree, no run of kubellm's own anywhere, nothing RUNNING once the
    plugin closed the KFP run. A failed deploy, retried, re-attaches to the same runs."""
    from mlflow import MlflowClient

    sys.path.insert(0, str(REPO / "tests" / "pipelines"))
    from localrun import ENV, command, result

    client = MlflowClient(mlflow_server)
    exp = client.create_experiment(f"plugin-run-{tmp_path.name}")
    kubellm_exp = f"kubellm-{tmp_path.name}"
    model = f"plugin-lm-{tmp_path.name}"
    state = tmp_path / "plugin.json"
    state.write_text(json.dumps({"uri": mlflow_server, "experiment_id": exp, "kfp_run_name": "kfp-run-1"}))
    sets = ["--set", f"tracking.experiment={kubellm_exp}", "--set", f"tracking.registered_model={model}"]
    bad = '{"deploy": {"smoke_max_tokens": 0}}'  # refused by the deploy step's config validation

    def under_plugin(*args: str) -> tuple[int, dict | None, str]:
        cmd = command(tmp_path, *sets, *args)
        proc = subprocess.run(
            [sys.executable, str(HERE / "mlflow_plugin.py"), str(state), "--", *cmd[3:]],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=ENV,
            timeout=1100,
        )
        return result(proc.returncode, proc.stdout, proc.stderr)

    code, failed, out = under_plugin("--param", f"deploy_config={bad}")
    assert code == 1, out[-3000:]
    assert failed is not None and failed["failed_stage"] == "deploy", out[-3000:]
    first = json.loads(state.read_text())["state"]
    deploy_run = first["tasks"]["deploy"]
    assert client.get_run(deploy_run).info.status == "FAILED"

    code, s, out = under_plugin("--resume", failed["run_name"])  # the retried KFP run
    assert code == 0, out[-3000:]
    plugin = json.loads(state.read_text())["state"]
    parent = plugin["parent"]
    assert plugin["parent"] == first["parent"] and plugin["tasks"]["deploy"] == deploy_run

    runs = _all_runs(client, exp)
    assert sorted(r.info.run_id for r in runs) == sorted([parent, *plugin["tasks"].values()])
    assert all(r.info.status != "RUNNING" for r in runs)
    assert client.get_experiment_by_name(kubellm_exp) is None  # kubellm opened nothing of its own
    assert not (tmp_path / "mlflow.db").exists()
    by_stage = {r.data.tags["stage"]: r for r in runs if "stage" in r.data.tags}
    assert {"prep", "pretrain", "prep_instruct", "finetune", "evaluate", "register", "deploy"} <= set(by_stage)
    for stage, run in by_stage.items():
        assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED", stage
        assert run.info.run_id == plugin["tasks"][run.info.run_name], stage  # the task's own run
    # register logged into its task's run in both attempts: the second re-attached to it; deploy, refused
    # before its stage began the first time, logged into the same (reopened) run the second time
    assert by_stage["register"].data.tags["attempt"] == "2" and "error" not in by_stage["deploy"].data.tags
    assert "loss" in by_stage["pretrain"].data.metrics and "perplexity" in by_stage["evaluate"].data.metrics

    head = client.get_run(parent)
    assert head.data.tags["run_kind"] == "parent" and head.data.tags["kubellm.status"] == "FINISHED"
    assert head.data.metrics["perplexity"] == by_stage["evaluate"].data.metrics["perplexity"]
    assert "held-out perplexity" in head.data.tags["mlflow.note.content"]
    versions = client.search_model_versions(f"name = '{model}'")
    assert versions and {v.run_id for v in versions} <= {by_stage["register"].info.run_id}
    assert s["status"] == "FINISHED" and s["mlflow"]["parent_run_id"] == parent


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_workspace_keeps_a_teams_runs_and_models_apart(
    workspaces_mlflow_server: str, tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLFLOW_WORKSPACE, as the plugin sets it, reaches every client kubellm makes (MLflow sends it as the
    X-MLFLOW-WORKSPACE header): a stage run and the version it registers land in that workspace and another
    team's workspace sees neither; a training job launched from the step is handed the same settings."""
    from mlflow import MlflowClient

    from kubellm.config import TrackingConfig
    from kubellm.tracking import register_model, stage_run
    from kubellm.tracking.kfp_plugin import client_env

    admin = MlflowClient(workspaces_mlflow_server)
    for team in ("team-a", "team-b"):
        admin.create_workspace(team)
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-a")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", workspaces_mlflow_server)
    monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "my-sso-plugin")  # an auth plugin the pods can use too
    assert client_env() == {
        "MLFLOW_WORKSPACE": "team-a",
        "MLFLOW_TRACKING_URI": workspaces_mlflow_server,
        "MLFLOW_TRACKING_AUTH": "my-sso-plugin",
    }
    monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "kubernetes-namespaced")  # needs a token training pods lack
    assert client_env() == {"MLFLOW_WORKSPACE": "team-a", "MLFLOW_TRACKING_URI": workspaces_mlflow_server}
    monkeypatch.delenv("MLFLOW_TRACKING_AUTH")  # no Kubernetes here to take a token from
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cfg = TrackingConfig(uri=workspaces_mlflow_server, experiment="ws-exp", registered_model="ws-lm")
    with stage_run(cfg, tmp_path, parent_run_id=None, stage="register") as tracker:
        tracker.log_metrics({"perplexity": 3.5})
        version = register_model(cfg, tmp_path, tiny_models["full"], run_id=tracker.run_id)

    def seen_by(team: str) -> tuple[bool, list[str]]:
        monkeypatch.setenv("MLFLOW_WORKSPACE", team)
        client = MlflowClient(workspaces_mlflow_server)
        return client.get_experiment_by_name("ws-exp") is not None, [m.name for m in client.search_registered_models()]

    assert seen_by("team-a") == (True, ["ws-lm"])
    assert seen_by("team-b") == (False, [])
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-a")
    client = MlflowClient(workspaces_mlflow_server)
    assert client.get_run(tracker.run_id).data.metrics["perplexity"] == 3.5
    assert client.get_model_version("ws-lm", str(version.version)).run_id == tracker.run_id
