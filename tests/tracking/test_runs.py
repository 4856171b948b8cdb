"""Parent and stage runs in a real sqlite MLflow store, read back by another process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from trackhelpers import read_back

from kubellm.config.tracking import TrackingConfig
from kubellm.tracking import (
    NullTracker,
    TrackingError,
    end_parent_run,
    find_parent_run,
    flatten_params,
    resolve_tracking_uri,
    stage_run,
    start_parent_run,
)


def _client(cfg: TrackingConfig, wd: Path):
    from mlflow import MlflowClient

    return MlflowClient(resolve_tracking_uri(cfg, wd))


def test_flatten_params_dotted_keys_and_limits() -> None:
    flat = flatten_params(
        {
            "data": {"sources": [{"uri": "a"}, {"uri": "b"}], "max_docs": None, "kind": "x"},
            "lr": 0.003,
            "on": True,
            "ids": [1, 2],
            "empty": {},
            "long": "z" * 600,
        }
    )
    assert flat == {
        "data.sources.0.uri": "a",
        "data.sources.1.uri": "b",
        "data.max_docs": "null",
        "data.kind": "x",
        "lr": "0.003",
        "on": "true",
        "ids": "[1, 2]",
        "empty": "{}",
        "long": "z" * 497 + "...",
    }
    assert all(len(v) <= 500 for v in flat.values())


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wd = tmp_path / "a" / "wd"
    assert resolve_tracking_uri(TrackingConfig(), wd) == f"sqlite:///{wd.resolve()}/mlflow.db"
    assert wd.is_dir()  # created, so sqlite can create its file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(TrackingConfig(), wd) == "http://env:5000"
    assert resolve_tracking_uri(TrackingConfig(uri="http://cfg:5000"), wd) == "http://cfg:5000"


@pytest.mark.slow
def test_lifecycle_read_back_in_another_process(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELLM_GIT_REVISION", "abc123")
    from kubellm.tracking import runs

    runs.git_revision.cache_clear()
    cfg = TrackingConfig(experiment="life")
    config = {"name": "demo", "finetune": {"lora": {"r": 8}}, "note": "n" * 700}
    parent = start_parent_run(
        cfg, workdir, pipeline="lifecycle", run_name="demo", config=config, tags={"kfp_run_id": "kfp-123"}
    )
    with stage_run(cfg, workdir, parent_run_id=parent, stage="finetune", config={"lora": {"r": 8}}) as tr:
        for step in (1, 2, 3):
            tr.log_metrics({"loss": 4.0 - step}, step=step)
        report = workdir / "report.md"
        report.write_text("# hi\n")
        tr.log_artifact(report)
        stage_id = tr.run_id
    end_parent_run(cfg, workdir, parent, "FINISHED", summary={"passed": True, "version": 3, "why": "ok"})
    runs.git_revision.cache_clear()

    got = read_back(resolve_tracking_uri(cfg, workdir), "life")["runs"]
    p, s = got[parent], got[stage_id]
    assert p["status"] == "FINISHED" and s["status"] == "FINISHED"
    assert p["params"] == {}  # the whole config is config.json, not hundreds of params
    assert p["metrics"] == {"passed": 1.0, "version": 3.0}
    assert {"config.json", "summary.json"} <= set(p["artifacts"])
    from kubellm.tracking.runs import config_hash

    assert p["tags"]["kfp_run_id"] == "kfp-123" and p["tags"]["pipeline"] == "lifecycle"
    assert p["tags"]["config_hash"] == config_hash(config) and p["tags"]["git_revision"] == "abc123"
    assert s["tags"]["mlflow.parentRunId"] == parent and s["tags"]["stage"] == "finetune"
    assert s["tags"]["kfp_run_id"] == "kfp-123" and s["tags"]["pipeline"] == "lifecycle"
    assert s["params"] == {"lora.r": "8"} and s["history"]["loss"] == [[1, 3.0], [2, 2.0], [3, 1.0]]
    assert set(s["artifacts"]) == {"config.json", "report.md"}


def test_parent_is_idempotent_per_kfp_run(workdir: Path) -> None:
    cfg = TrackingConfig(experiment="idem")
    first = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config={"a": 1}, tags={"kfp_run_id": "k1"})
    end_parent_run(cfg, workdir, first, "FAILED")
    again = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config={"a": 1}, tags={"kfp_run_id": "k1"})
    other = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config={"a": 1}, tags={"kfp_run_id": "k2"})
    assert again == first and other != first
    assert _client(cfg, workdir).get_run(first).info.status == "RUNNING"  # resumed
    assert find_parent_run(cfg, workdir, "k1") == first and find_parent_run(cfg, workdir, "k3") is None


def test_failing_stage_ends_failed_and_retry_reattaches(workdir: Path) -> None:
    cfg = TrackingConfig(experiment="retry")
    parent = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config={})
    with (
        pytest.raises(ValueError, match="boom"),
        stage_run(cfg, workdir, parent_run_id=parent, stage="train", config={"x": 1}) as tr,
    ):
        tr.log_metrics({"loss": 2.0}, step=1)
        first = tr.run_id
        raise ValueError("boom")
    client = _client(cfg, workdir)
    run = client.get_run(first)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "ValueError: boom"

    with stage_run(cfg, workdir, parent_run_id=parent, stage="train", config={"x": 1}) as tr:
        assert tr.run_id == first  # the retry continues its own run, no duplicate
        tr.log_metrics({"loss": 1.0}, step=2)
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2" and "error" not in run.data.tags

    # a finished stage is never reused: running it again makes a new run
    with stage_run(cfg, workdir, parent_run_id=parent, stage="train") as tr:
        assert tr.run_id != first


def test_sigterm_with_earlier_python_handler_marks_killed_and_chains(workdir: Path) -> None:
    cfg = TrackingConfig(experiment="chain")
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
    try:
        with stage_run(cfg, workdir, parent_run_id=None, stage="train") as tr:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before the next line
            time.sleep(0.05)
            run_id = tr.run_id
        assert seen == [signal.SIGTERM]  # the training loop's own handler still ran
        assert _client(cfg, workdir).get_run(run_id).info.status == "KILLED"  # and was not overwritten
        assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_interruption_errors_end_killed(workdir: Path) -> None:
    from kubellm.errors import TrainingError

    class Preempted(TrainingError):  # like kubellm.train.loop.TrainingInterrupted: checkpointed, exits 143
        exit_code = 143

    cfg = TrackingConfig(experiment="interrupt")
    ids = {}
    for name, err in [
        ("pre", Preempted("SIGTERM: checkpoint written")),
        ("ctrl-c", KeyboardInterrupt()),
        ("exit", SystemExit(1)),
    ]:
        with pytest.raises(type(err)), stage_run(cfg, workdir, parent_run_id=None, stage=name) as tr:
            ids[name] = tr.run_id
            raise err
    client = _client(cfg, workdir)
    assert [client.get_run(ids[n]).info.status for n in ("pre", "ctrl-c", "exit")] == ["KILLED", "KILLED", "FAILED"]


_SLEEPER = textwrap.dedent("""
    import os, sys, time
    from kubellm.config.tracking import TrackingConfig
    from kubellm.tracking import stage_run, start_parent_run
    wd, marker = sys.argv[1:3]
    cfg = TrackingConfig(experiment="sigterm")
    parent = start_parent_run(cfg, wd, pipeline="p", run_name="r", config={})
    with stage_run(cfg, wd, parent_run_id=parent, stage="train") as tr:
        open(marker + ".tmp", "w").write(tr.run_id)
        os.replace(marker + ".tmp", marker)
        time.sleep(120)
""")


@pytest.mark.slow
def test_sigterm_ends_stage_killed_and_exits_143(workdir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "run_id"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLEEPER, str(workdir), str(marker)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the stage never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_id = marker.read_text()
    assert _client(TrackingConfig(), workdir).get_run(run_id).info.status == "KILLED"


def test_end_parent_marks_orphaned_stages_killed(workdir: Path) -> None:
    cfg = TrackingConfig(experiment="orphans")
    parent = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config={})
    client = _client(cfg, workdir)
    # a stage whose process was SIGKILLed: its run was created and never ended
    orphan = client.create_run(
        client.get_run(parent).info.experiment_id, tags={"mlflow.parentRunId": parent, "stage": "train"}
    ).info.run_id
    end_parent_run(cfg, workdir, parent, "FAILED")
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(parent).info.status == "FAILED"


def test_disabled_tracking_logs_nowhere(tmp_path: Path) -> None:
    cfg = TrackingConfig(enabled=False)
    assert start_parent_run(cfg, tmp_path, pipeline="p", run_name="r", config={}) == ""
    with stage_run(cfg, tmp_path, parent_run_id="", stage="train") as tr:
        assert isinstance(tr, NullTracker)
    end_parent_run(cfg, tmp_path, "", "FINISHED")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_one_line_errors(workdir: Path) -> None:
    cfg = TrackingConfig()
    with pytest.raises(TrackingError, match="stage 'a b'"), stage_run(cfg, workdir, parent_run_id=None, stage="a b"):
        pass
    with pytest.raises(TrackingError, match="status 'DONE'"):
        end_parent_run(cfg, workdir, "x", "DONE")  # type: ignore[arg-type]
    with (
        pytest.raises(TrackingError, match="MLflow at sqlite"),
        stage_run(cfg, workdir, parent_run_id="0" * 32, stage="train"),
    ):
        pass


def test_a_retry_on_another_disk_finds_the_unfixable_error_on_the_parent(workdir: Path, tmp_path: Path) -> None:
    """Pods with separate working directories share the record through the parent run's tag."""
    from kubellm.errors import ConfigError
    from kubellm.stages import StageContext
    from kubellm.stages.attempts import TAG_PREFIX

    cfg = TrackingConfig(experiment="unfixable", uri=f"sqlite:///{workdir / 'mlflow.db'}")
    parent = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config={}, tags={"kfp_run_id": "k1"})
    first = StageContext(cfg, str(tmp_path / "pod-1"), parent, kfp_run_id="k1")
    with pytest.raises(ConfigError), first.stage("deploy"):
        raise ConfigError("serve.max_prompt_tokens=4 is too small")
    client = _client(cfg, workdir)
    assert (
        client.get_run(parent).data.tags[TAG_PREFIX + "deploy"] == "ConfigError: serve.max_prompt_tokens=4 is too small"
    )
    retry = StageContext(cfg, str(tmp_path / "pod-2"), parent, kfp_run_id="k1")
    with pytest.raises(ConfigError, match=r"too small \(not retried"), retry.stage("deploy"):
        raise AssertionError("the retried attempt must not run")
    exp = client.get_run(parent).info.experiment_id
    stage_runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [r.info.status for r in stage_runs] == ["FAILED"]  # no second run for the fast failure
