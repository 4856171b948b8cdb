"""The parent run of a lifecycle run tells its story in the MLflow UI."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow import MlflowClient

from kubellm.config.tracking import TrackingConfig
from kubellm.stages import StageContext, registry
from kubellm.tracking import end_parent_run, resolve_tracking_uri, stage_run, start_parent_run
from kubellm.tracking.headline import NOTE_TAG


def test_the_parent_run_carries_metrics_gate_version_and_a_description(
    workdir: Path, tiny_models: dict[str, Path]
) -> None:
    cfg = TrackingConfig(registered_model="story")
    config = {"name": "demo", "pretrain": {"loop": {"max_steps": 3}}, "evaluate": {"gate": {}}}
    parent = start_parent_run(
        cfg, workdir, pipeline="llm-lifecycle", run_name="demo", config=config, tags={"kfp_run_id": "k1"}
    )
    with stage_run(cfg, workdir, parent_run_id=parent, stage="evaluate") as ev:
        ev.log_metrics({"perplexity": 80.0, "base_perplexity": 400.0, "perplexity_ratio": 0.2, "gate_passed": 1.0})
    uri = registry.register(tiny_models["full"], StageContext(cfg, str(workdir), parent)).values["uri"]
    end_parent_run(cfg, workdir, parent, "FINISHED", summary={"kfp_state": "SUCCEEDED"})

    client = MlflowClient(resolve_tracking_uri(cfg, workdir))
    run = client.get_run(parent)
    assert run.data.params == {}  # the config is one artifact, not hundreds of params
    assert "config.json" in [a.path for a in client.list_artifacts(parent)]
    m = run.data.metrics
    assert (m["perplexity"], m["perplexity_ratio"], m["gate_passed"], m["registered_version"]) == (80.0, 0.2, 1.0, 1.0)
    # the name tells it apart in a truncated runs list: pipeline, outcome, start; the run's own name is a tag
    started = time.strftime("%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
    assert run.data.tags["registered_model"] == "models:/story/1"
    assert run.info.run_name == f"lifecycle · v1 registered · {started}" and run.data.tags["run_name"] == "demo"
    note = run.data.tags[NOTE_TAG]
    assert (
        "| gate | passed |" in note
        and "| registered | [story v1](#/models/story/versions/1) |" in note
        and "0.200" in note
    )
    version = client.get_model_version("story", "1")
    assert uri == "models:/story/1"
    produced = version.source.removeprefix("models:/")
    assert produced.startswith("m-") and [o.model_id for o in run.outputs.model_outputs] == [produced]


def test_a_parent_run_is_named_running_then_by_how_it_ended(workdir: Path) -> None:
    cfg = TrackingConfig(experiment="names")
    client = MlflowClient(resolve_tracking_uri(cfg, workdir))
    failed = start_parent_run(cfg, workdir, pipeline="llm-lifecycle", run_name="local-1", config={})
    closed = start_parent_run(cfg, workdir, pipeline="my-finetune", run_name="local-2", config={})
    assert client.get_run(failed).info.run_name.startswith("lifecycle · running · ")
    try:
        with stage_run(cfg, workdir, parent_run_id=failed, stage="deploy"):
            raise RuntimeError("rollout failed")
    except RuntimeError:
        pass
    with stage_run(cfg, workdir, parent_run_id=closed, stage="evaluate") as ev:
        ev.log_metrics({"gate_passed": 0.0})
        ev.set_tags({"closes": "empty_answer_rate 0.9 > 0.5"})
    end_parent_run(cfg, workdir, failed, "FAILED")
    end_parent_run(cfg, workdir, closed, "FINISHED")
    assert client.get_run(failed).info.run_name.startswith("lifecycle · failed at deploy · ")
    assert client.get_run(closed).info.run_name.startswith("my-finetune · gate failed · ")
    # the run summary finds the parent by the pipeline run's own name (`kubellm run`'s folder), not MLflow's
    from kubellm.summary import collect

    found = collect(cfg, workdir, pipeline="llm-lifecycle", run_name="local-1", stages=["deploy"])
    assert found["mlflow"]["parent_run_id"] == failed and found["failed_stage"] == "deploy"
