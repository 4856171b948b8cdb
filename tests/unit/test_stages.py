"""Stage wrappers: what a KFP task process does with the library's results and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm import stages
from kubellm.config import load_config
from kubellm.config.params import to_param

REPO = Path(__file__).resolve().parents[2]


def test_preempted_training_exits_143_for_the_retry_policy(tmp_path: Path, monkeypatch) -> None:
    import kubellm.train.pretrain as pre
    from kubellm.train.loop import TrainingInterrupted

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("SIGTERM at step 7: checkpoint written")

    monkeypatch.setattr(pre, "pretrain", interrupted)
    cfg = load_config(REPO / "configs" / "local.yaml", ["tracking.enabled=false"])
    trk = stages.Tracking.from_param(to_param(cfg.tracking), str(tmp_path))
    with pytest.raises(SystemExit) as info:
        stages.pretrain(to_param(cfg.pretrain), str(tmp_path), str(tmp_path / "out"), trk)
    assert info.value.code == 143


def test_publish_writes_report_metrics_and_metadata(tmp_path: Path) -> None:
    class Metrics:
        def __init__(self) -> None:
            self.logged: dict[str, float] = {}

        def log_metric(self, name: str, value: float) -> None:
            self.logged[name] = value

    class Artifact:
        metadata: dict = {}

    out = stages.StageOutput({"perplexity": 3.5, "gate_passed": 1.0}, "# Report\n")
    m, a = Metrics(), Artifact()
    stages.publish(out, report=str(tmp_path / "r" / "report.md"), metrics=m, artifact=a)
    assert (tmp_path / "r" / "report.md").read_text() == "# Report\n"
    assert m.logged == {"gate_passed": 1.0, "perplexity": 3.5} == a.metadata


def test_rank_trials_picks_the_best_that_passed(tmp_path: Path) -> None:
    import json

    dirs = []
    for i, (passed, ppl) in enumerate([(True, 9.0), (False, 2.0), (True, 5.0)]):
        d = tmp_path / f"t{i}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"passed": passed, "metrics": {"perplexity": ppl}}))
        dirs.append(str(d))
    best, report = stages._rank_trials(dirs, "perplexity", "min")
    assert best == 2 and "trial 3" in report
    assert stages._rank_trials(dirs, "perplexity", "max")[0] == 0
    none, text = stages._rank_trials(dirs[1:2], "perplexity", "min")
    assert none is None and "No trial passed" in text


@pytest.mark.parametrize("status", ["promoted", "rolled_back"])
def test_cluster_deploy_goes_through_the_rollout_and_fails_the_step_on_rollback(
        status: str, tmp_path: Path, monkeypatch) -> None:
    import yaml

    import kubellm.k8s.rollout as rollout
    from kubellm.errors import ServingError

    calls = []

    def roll_out(cfg, storage_uri, *, model_version=None, **kw):
        calls.append((cfg, storage_uri, model_version))
        return rollout.RolloutResult(status=status, reason="smoke test said no" if status != "promoted" else "ok",
                                     url="http://local-kubellm.kubellm.example.com")

    monkeypatch.setattr(rollout, "deploy", roll_out)
    cfg = load_config(REPO / "configs" / "local.yaml",
                      ["tracking.enabled=false", "deploy.storage_uri=s3://models/kubellm/7"])
    trk = stages.Tracking.from_param(to_param(cfg.tracking), str(tmp_path))
    out = tmp_path / "manifests"
    if status == "promoted":
        res = stages.deploy(to_param(cfg), "models:/kubellm-local/7", str(out), trk, target="cluster")
        assert res.values["endpoint"] == "http://local-kubellm.kubellm.example.com"
    else:
        with pytest.raises(ServingError, match="rolled_back: smoke test said no"):
            stages.deploy(to_param(cfg), "models:/kubellm-local/7", str(out), trk, target="cluster")
    ((step_cfg, uri, version),) = calls
    assert uri == "s3://models/kubellm/7" and version == "7"
    assert step_cfg.deploy.playground is False  # the pipeline's own playground step applies it
    isvc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert isvc["kind"] == "InferenceService"
