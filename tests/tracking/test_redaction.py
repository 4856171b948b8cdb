"""What a run logs as params and ``config.json`` is redacted: a stage config that only its own section
model validated (a component's ``deploy`` dict, say) can still carry a token; MLflow users never see it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trackhelpers import read_back

from kubellm.config.tracking import TrackingConfig
from kubellm.tracking import resolve_tracking_uri, stage_run, start_parent_run

TOKEN = "hf_" + "A1b2C3d4" * 5
PASSWORD = "hunter2-" + "z" * 8


def test_logged_configs_are_redacted(workdir: Path) -> None:
    cfg = TrackingConfig(experiment="redact")
    config = {
        "deploy": {"hf_args": [f"--hf-token={TOKEN}"], "storage_uri": f"s3://k:{PASSWORD}@bucket/m"},
        "env": {"API_KEY": "plain-looking"},
        "serve": {"max_new_tokens": 16},
    }
    parent = start_parent_run(cfg, workdir, pipeline="p", run_name="r", config=config)
    with stage_run(cfg, workdir, parent_run_id=parent, stage="deploy", config=config) as tr:
        stage = tr.run_id
    got = read_back(resolve_tracking_uri(cfg, workdir), "redact")
    from mlflow import MlflowClient

    client = MlflowClient(resolve_tracking_uri(cfg, workdir))
    params = got["runs"][stage]["params"]  # a stage logs its config as params too, the parent only the file
    assert params["deploy.hf_args"] == '["--hf-token=***"]'
    assert params["deploy.storage_uri"] == "s3://***@bucket/m" and params["env.API_KEY"] == "***"
    assert params["serve.max_new_tokens"] == "16"  # ordinary values untouched
    for run_id in (parent, stage):
        logged = client.download_artifacts(run_id, "config.json", str(workdir / run_id))
        text = Path(logged).read_text()
        assert TOKEN not in text and PASSWORD not in text and "plain-looking" not in text
        assert json.loads(text)["serve"] == {"max_new_tokens": 16}
    assert config["env"]["API_KEY"] == "plain-looking"  # the caller's dict is left alone


def test_a_password_in_the_tracking_uri_moves_to_mlflows_variables(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://admin:{PASSWORD}@mlflow.example.com:5000/base")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "https://mlflow.example.com:5000/base"
    import os

    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("admin", PASSWORD)
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com:5000/base"  # for the tasks it starts


@pytest.mark.integration
def test_mlflows_view_run_lines_never_show_the_password(
    mlflow_server: str, workdir: Path, monkeypatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Issue 24: MLflow prints "View run … at: <tracking URI>/#/…" after every run, password included.
    # The test server has no authentication: it ignores the credentials.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.replace("http://", f"http://admin:{PASSWORD}@"))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with stage_run(TrackingConfig(experiment="view-run"), workdir, parent_run_id=None, stage="prep") as tr:
        tr.log_metrics({"loss": 1.0}, step=1)
    out, err = capfd.readouterr()
    assert "View run" in out and f"{mlflow_server}/#/experiments/" in out
    assert PASSWORD not in out + err
