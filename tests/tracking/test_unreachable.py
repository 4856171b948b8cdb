"""Tracking cannot stall training (issue 24): every call to a server is bounded, metrics wait while the
server is away and are sent when it is back, the stage's verdict is training's, and no run stays RUNNING.

Before: with the server dead, training printed nothing for ~10 minutes inside MLflow's retries, then
failed with a 153-line traceback; the stage run stayed RUNNING for good, even after a later successful
resume (which opened a new run).

The server's absence is played by the client's own calls failing as MLflow fails them when nothing
answers (``MlflowException`` ``INTERNAL_ERROR``, "API request … failed"); one test measures a real
refused connection.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kubellm.config.tracking import TrackingConfig
from kubellm.tracking import TrackingError, connect, resolve_tracking_uri, runs, stage_run
from kubellm.tracking import mlflow_tracker as mt

AWAY = "API request to http://mlflow:5000/api/2.0/mlflow/runs/log-batch failed with exception ConnectionError"


class Outage:
    """Makes a client's calls fail while ``down``, counting the calls made meanwhile."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, client: MlflowClient, *names: str) -> None:
        self.down, self.calls = False, 0
        for name in names:
            real = getattr(client, name)
            monkeypatch.setattr(client, name, self._wrap(real))

    def _wrap(self, real):
        def call(*args, **kwargs):
            if self.down:
                self.calls += 1
                raise MlflowException(AWAY)  # error_code INTERNAL_ERROR, as MLflow's REST client raises it
            return real(*args, **kwargs)

        return call


def _history(workdir: Path, run_id: str, key: str) -> list[int]:
    client = MlflowClient(resolve_tracking_uri(TrackingConfig(), workdir))
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_metrics_wait_while_the_server_is_away_and_go_out_when_it_is_back(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(mt, "_RETRY_S", 1.0)
    with (
        caplog.at_level(logging.WARNING, logger="kubellm"),
        stage_run(TrackingConfig(experiment="away"), workdir, parent_run_id=None, stage="pretrain") as tr,
    ):
        outage = Outage(monkeypatch, tr.client, "log_batch")
        tr.log_metrics({"loss": 3.0}, step=1)
        outage.down = True
        for step in range(2, 12):
            tr.log_metrics({"loss": 3.0 - step / 10}, step=step)
        assert outage.calls == 1  # one failed call; the steps after it wait without calling
        deadline = time.monotonic() + 10
        while outage.calls < 2 and time.monotonic() < deadline:  # after _RETRY_S, the next step tries again
            time.sleep(0.05)
            tr.log_metrics({"lr": 0.1}, step=12)
        outage.down = False
        time.sleep(mt._RETRY_S + 0.05)
        tr.log_metrics({"loss": 1.5}, step=13)  # the server answers: everything that waited goes out
        run_id = tr.run_id
    assert _history(workdir, run_id, "loss") == [1, *range(2, 12), 13]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warnings] == ["tracking degraded", "tracking recovered"]
    assert MlflowClient(resolve_tracking_uri(TrackingConfig(), workdir)).get_run(run_id).info.status == "FINISHED"


def test_a_server_away_at_the_end_leaves_the_verdict_to_training_and_the_next_run_closes_the_run(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = TrackingConfig(experiment="away")
    with (
        caplog.at_level(logging.WARNING, logger="kubellm"),
        stage_run(cfg, workdir, parent_run_id=None, stage="pretrain") as tr,
    ):
        outage = Outage(monkeypatch, tr.client, "log_batch", "set_terminated", "log_artifact")
        outage.down = True
        tr.log_metrics({"loss": 2.0}, step=1)
        tr.log_dict({"a": 1}, "curve.json")
        run_id = tr.run_id
    # No exception: the stage finished; its run could not be closed.
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("artifact curve.json not logged" in line for line in lines)
    assert any(f"run {run_id}: 1 metric points could not be sent" in line for line in lines)
    assert any(
        f"run {run_id}: could not be marked FINISHED" in line and "the next run of this stage closes it" in line
        for line in lines
    )
    client = MlflowClient(resolve_tracking_uri(cfg, workdir))
    assert client.get_run(run_id).info.status == "RUNNING"
    client.set_tag(run_id, runs.TAG_PID, "999999999")  # the process that ran it is gone
    with stage_run(cfg, workdir, parent_run_id=None, stage="pretrain") as again:
        assert again.run_id != run_id
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(again.run_id).info.status == "FINISHED"


def test_a_run_of_a_live_process_is_not_closed(workdir: Path) -> None:
    cfg = TrackingConfig(experiment="away")
    with (
        stage_run(cfg, workdir, parent_run_id=None, stage="pretrain") as outer,
        stage_run(cfg, workdir, parent_run_id=None, stage="pretrain"),
    ):
        status = MlflowClient(resolve_tracking_uri(cfg, workdir)).get_run(outer.run_id).info.status
    assert status == "RUNNING"  # this very process still runs it


def test_when_unreachable_fail_stops_the_stage_with_one_line(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrackingConfig(experiment="away", when_unreachable="fail")
    with pytest.raises(TrackingError) as info, stage_run(cfg, workdir, parent_run_id=None, stage="pretrain") as tr:
        Outage(monkeypatch, tr.client, "log_batch").down = True
        tr.log_metrics({"loss": 2.0}, step=1)
    assert str(info.value).endswith("the stage stops (tracking.when_unreachable: fail)")
    assert "\n" not in str(info.value)


def test_a_call_to_a_server_that_is_gone_takes_seconds_not_minutes(tmp_path: Path, monkeypatch) -> None:
    for name in connect._HTTP_LIMITS:  # restored after the test: mlflow_client sets them for this process
        monkeypatch.delenv(name, raising=False)
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client, _ = connect.mlflow_client(TrackingConfig(uri=f"http://127.0.0.1:{port}"), tmp_path)
    tracker = mt.MlflowTracker(client, "0" * 32, when_unreachable="buffer", uri=f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    tracker.log_metrics({"loss": 1.0}, step=1)  # refused, retried twice, then buffered
    first = time.monotonic() - t0
    tracker.log_metrics({"loss": 0.9}, step=2)  # known to be away: no call at all
    # MLflow's own defaults (7 retries, exponential backoff, 120 s timeouts) took minutes here.
    assert first < 30 and time.monotonic() - t0 - first < 1
    assert len(tracker._waiting) == 2
