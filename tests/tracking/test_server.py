"""Against a real ``mlflow server`` on 127.0.0.1: a stage and a registration over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
from trackhelpers import read_back

from kubellm.config.tracking import TrackingConfig
from kubellm.tracking import (
    champion_info,
    end_parent_run,
    promote,
    register_model,
    resolve_model_uri,
    stage_run,
    start_parent_run,
)


@pytest.mark.integration
@pytest.mark.slow
def test_stage_and_registration_over_http(mlflow_server: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    cfg = TrackingConfig(uri=mlflow_server, experiment="http", registered_model="http-lm")
    parent = start_parent_run(
        cfg,
        tmp_path,
        pipeline="lifecycle",
        run_name="over-http",
        config={"a": {"b": 1}},
        tags={"kfp_run_id": "kfp-http"},
    )
    with stage_run(cfg, tmp_path, parent_run_id=parent, stage="register", config={"x": 2}) as tr:
        tr.log_metrics({"loss": 1.5}, step=1)
        info = register_model(cfg, tmp_path, tiny_models["adapter"], run_id=tr.run_id, tags={"data_fingerprint": "f"})
        stage_id = tr.run_id
    promote(cfg, tmp_path, info.version)
    end_parent_run(cfg, tmp_path, parent, "FINISHED")

    got = read_back(mlflow_server, "http", "http-lm")
    assert got["runs"][parent]["status"] == "FINISHED" and "config.json" in got["runs"][parent]["artifacts"]
    stage = got["runs"][stage_id]
    assert stage["status"] == "FINISHED" and stage["metrics"] == {"loss": 1.5}
    assert stage["tags"]["mlflow.parentRunId"] == parent and stage["tags"]["kfp_run_id"] == "kfp-http"
    assert [(v["version"], v["aliases"]) for v in got["versions"]] == [(1, ["candidate", "champion"])]
    assert champion_info(cfg, tmp_path).tags["data_fingerprint"] == "f"

    # the artifacts went through the server's proxy; nothing was written beside the client
    path = resolve_model_uri(cfg, tmp_path, "models:/http-lm@champion")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
