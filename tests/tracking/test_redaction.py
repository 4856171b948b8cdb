"""What a run logs as params and ``config.json`` is redacted: a stage config that only its own section
model validated (a component's ``deploy`` dict, say) can still carry a token; MLflow users never see it."""

from __future__ import annotations

import json
from pathlib import Path

from trackhelpers import read_back

from kubellm.config.tracking import TrackingConfig
from kubellm.tracking import resolve_tracking_uri, stage_run, start_parent_run

TOKEN = "hf_" + "A1b2C3d4" * 5
PASSWORD = "hunter2-" + "z" * 8


def test_logged_configs_are_redacted(workdir: Path) -> None:
    cfg = TrackingConfig(experiment="redact")
    config = {"deploy": {"hf_args": [f"--hf-token={TOKEN}"], "storage_uri": f"s3://k:{PASSWORD}@bucket/m"},
              "env": {"API_KEY": "plain-looking"}, "serve": {"max_new_tokens": 16}}
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
