"""One tracked path for every entrance: a training job's pods log into the launching step's MLflow run,
and `kubellm pretrain` on the command line leaves the same run a pipeline step does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubellm.config import TrackingConfig
from kubellm.config.params import to_param
from kubellm.stages import STAGE_RUN_ENV

BIN = Path(sys.executable).parent
LOOP = {
    "max_steps": 24,
    "log_every": 2,
    "checkpoint_every": 6,
    "micro_batch_size": 2,
    "precision": "fp32",
    "eval_every": 1000,
}
SETS = [a for k, v in LOOP.items() for a in ("--set", f"pretrain.loop.{k}={v}")]


def _loss_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.mark.slow
@pytest.mark.integration
def test_torchrun_job_logs_once_into_the_step_run_and_continues_it_after_a_restart(
    corpus: Path, tmp_path: Path, mlflow_server: str
) -> None:
    """What a PyTorchJob's pods do: `torchrun … kubellm pretrain` with the step's run id in the
    environment. Rank 0 logs into that run, rank 1 nowhere; killed with SIGKILL after a checkpoint and
    started again, the pods resume and the run's loss history holds every step exactly once."""
    from mlflow import MlflowClient

    from kubellm.tracking import stage_run
    from kubellm.train import checkpoint as ckpt
    from kubellm.train.loop import HISTORY_FILE

    tracking = TrackingConfig(uri=mlflow_server, experiment=f"pods-{tmp_path.name}")
    client = MlflowClient(mlflow_server)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(BIN / "kubellm"),
        "pretrain",
        "--data",
        str(corpus),
        "--out",
        str(out),
        *SETS,
        "--set",
        f"tracking.uri={mlflow_server}",
        "--set",
        f"tracking.experiment={tracking.experiment}",
    ]

    with stage_run(tracking, tmp_path, parent_run_id=None, stage="pretrain") as step:  # the launching step
        env[STAGE_RUN_ENV] = step.run_id
        first = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "first.log").open("w"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while not (
            ckpt.complete_checkpoints(out)
            and ckpt.complete_checkpoints(out)[-1][0] >= 12
            and (out / HISTORY_FILE).is_file()
            and json.loads((out / HISTORY_FILE).read_text().splitlines()[-1])["step"] >= 14
        ):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # a node lost: no handler runs on any rank
        first.wait(timeout=30)
        logged_before = _loss_steps(client, step.run_id)
        resumed_from = ckpt.complete_checkpoints(out)[-1][0]
        assert logged_before and logged_before[-1] > resumed_from  # steps after the checkpoint will run again

        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert second.returncode == 0, second.stderr[-3000:]
        assert client.get_run(step.run_id).info.status == "RUNNING"  # the step owns and ends it

    assert _loss_steps(client, step.run_id) == list(range(2, LOOP["max_steps"] + 1, 2))  # once each
    run = client.get_run(step.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["final_loss"] > 0
    exp = client.get_experiment_by_name(tracking.experiment)
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [step.run_id]  # no run per pod


@pytest.mark.slow
def test_cli_pretrain_is_tracked_like_the_pipeline_step(
    corpus: Path, tmp_path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kubellm pretrain` leaves the run the pretrain component leaves: same metrics, params, artifacts."""
    from mlflow import MlflowClient

    from kubellm.components.train import pretrain as component
    from kubellm.config import default_config_path, load_config
    from kubellm.tracking import resolve_tracking_uri, start_parent_run

    overrides = [*(s for s in SETS if s != "--set"), f"workdir={workdir}"]
    cli = subprocess.run(
        [
            str(BIN / "kubellm"),
            "pretrain",
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "cli"),
            *SETS,
            "--set",
            f"workdir={workdir}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]

    cfg = load_config(default_config_path(), overrides)  # what the CLI reads without --config
    parent = start_parent_run(
        cfg.tracking, workdir, pipeline="llm-lifecycle", run_name="t", config={}, tags={"kfp_run_id": "kfp-1"}
    )
    artifact = SimpleNamespace(path=str(tmp_path / "kfp" / "model"), metadata={})
    monkeypatch.setenv("KUBELLM_KFP_RUN_ID", "kfp-1")  # as the pod's run-id label sets it: finds `parent`
    component.python_func(
        config=to_param(cfg.pretrain),
        tracking=to_param(cfg.tracking),
        workdir=str(workdir),
        data=SimpleNamespace(path=str(corpus)),
        model=artifact,
        metrics=SimpleNamespace(log_metric=lambda k, v: None),
        report=SimpleNamespace(path=str(tmp_path / "kfp" / "report.md")),
    )

    client = MlflowClient(resolve_tracking_uri(cfg.tracking, workdir))
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id], "tags.stage = 'pretrain'"
    )
    assert len(runs) == 2
    by_parent = {r.data.tags.get("mlflow.parentRunId"): r for r in runs}
    piped, alone = by_parent[parent], by_parent[None]
    assert set(alone.data.metrics) == set(piped.data.metrics) >= {"loss", "lr", "tokens_per_s", "final_loss"}
    assert alone.data.params == piped.data.params and alone.data.params
    for r in (alone, piped):
        assert r.info.status == "FINISHED"
        assert _loss_steps(client, r.info.run_id) == list(range(2, LOOP["max_steps"] + 1, 2))
    arts = [sorted(a.path for a in client.list_artifacts(r.info.run_id)) for r in (alone, piped)]
    assert arts[0] == arts[1] and "config.json" in arts[0]
