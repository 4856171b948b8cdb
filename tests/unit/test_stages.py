"""Stage wrappers: what a KFP task process does with the library's results and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubellm.config import load_config
from kubellm.config.params import to_param
from kubellm.stages import StageContext, StageOutput, publish, train
from kubellm.stages import deploy as deploy_stage

REPO = Path(__file__).resolve().parents[2]


def test_preempted_training_exits_143_for_the_retry_policy(tmp_path: Path, monkeypatch) -> None:
    import kubellm.train.pretrain as pre
    from kubellm.train.loop import TrainingInterrupted

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("SIGTERM at step 7: checkpoint written")

    monkeypatch.setattr(pre, "pretrain", interrupted)
    cfg = load_config(REPO / "configs" / "local.yaml", ["tracking.enabled=false"])
    ctx = StageContext.from_param(to_param(cfg.tracking), str(tmp_path))
    with pytest.raises(SystemExit) as info:
        train.pretrain(to_param(cfg.pretrain), str(tmp_path / "data"), str(tmp_path / "out"), ctx)
    assert info.value.code == 143


def test_publish_writes_report_metrics_and_metadata(tmp_path: Path) -> None:
    class Metrics:
        def __init__(self) -> None:
            self.logged: dict[str, float] = {}

        def log_metric(self, name: str, value: float) -> None:
            self.logged[name] = value

    class Artifact:
        metadata: dict = {}

    out = StageOutput({"perplexity": 3.5, "gate_passed": 1.0}, "# Report\n")
    m, a = Metrics(), Artifact()
    publish(out, report=str(tmp_path / "r" / "report.md"), metrics=m, artifact=a)
    assert (tmp_path / "r" / "report.md").read_text() == "# Report\n"
    assert m.logged == {"gate_passed": 1.0, "perplexity": 3.5} == a.metadata


def test_rank_trials_picks_the_best_that_passed() -> None:
    from kubellm.evaluate.compare import rank_trials

    trials = [(True, 9.0), (False, 2.0), (True, 5.0)]
    assert rank_trials(trials, "min") == 2  # trial 2 is better but failed its gate
    assert rank_trials(trials, "max") == 0
    assert rank_trials(trials[1:2], "min") is None


@pytest.mark.parametrize("status", ["promoted", "rolled_back"])
def test_cluster_deploy_goes_through_the_rollout_and_fails_the_step_on_rollback(
    status: str, tmp_path: Path, monkeypatch
) -> None:
    import yaml

    import kubellm.k8s.rollout as rollout
    from kubellm.errors import ServingError

    calls = []

    def roll_out(isvc, *, namespace, **kw):
        calls.append(isvc)
        return rollout.RolloutResult(
            status=status,
            reason="smoke test said no" if status != "promoted" else "ok",
            url="http://local-kubellm.kubellm.example.com",
        )

    monkeypatch.setattr(rollout, "rollout", roll_out)
    cfg = load_config(
        REPO / "configs" / "local.yaml", ["tracking.enabled=false", "deploy.storage_uri=s3://models/kubellm/7"]
    )
    applied = []
    import kubellm.k8s.playground as playground

    monkeypatch.setattr(playground, "apply_playground", lambda objs, **kw: applied.append(objs))
    ctx = StageContext.from_param(to_param(cfg.tracking), str(tmp_path))
    out = tmp_path / "manifests"
    args = dict(
        target="cluster", model_uri="models:/kubellm-local/7", platform=to_param(cfg.platform), run_name=cfg.name
    )
    if status == "promoted":
        res = deploy_stage.deploy(to_param(cfg.release()), str(out), ctx, **args)
        assert res.values["endpoint"] == "http://local-kubellm.kubellm.example.com"
        assert len(applied) == 1  # the playground follows a healthy rollout, in the same step
    else:
        with pytest.raises(ServingError, match="rolled_back: smoke test said no"):
            deploy_stage.deploy(to_param(cfg.release()), str(out), ctx, **args)
        assert applied == []
    (isvc,) = calls
    assert "s3://models/kubellm/7" in json.dumps(isvc)  # the registry version is what gets served
    written = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert written == isvc and written["metadata"]["namespace"] == cfg.platform.namespace


def test_a_step_that_failed_on_its_input_fails_its_retries_at_once(tmp_path: Path) -> None:
    """KFP's retry policy has no error classes: the stage keeps the decision (kubellm.stages.attempts)."""
    import time

    from kubellm.config import TrackingConfig
    from kubellm.errors import ConfigError, DataError, SourceError

    off = TrackingConfig(enabled=False)
    ctx = StageContext(off, str(tmp_path), kfp_run_id="run-1")
    entered: list[str] = []

    def attempt(context: StageContext, stage: str, err: Exception | None) -> None:
        with context.stage(stage):
            entered.append(stage)
            if err is not None:
                raise err

    with pytest.raises(ConfigError, match=r"^serve.max_prompt_tokens=4 is too small$"):
        attempt(ctx, "deploy", ConfigError("serve.max_prompt_tokens=4 is too small"))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:  # the retry: same class, same message, and why; the body never runs
        attempt(ctx, "deploy", None)
    assert time.perf_counter() - t0 < 1.0 and entered == ["deploy"]
    assert str(info.value).startswith(
        "serve.max_prompt_tokens=4 is too small (not retried: an earlier attempt of step 'deploy' in this run failed"
    )
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not retried"):  # and so does every later retry
        attempt(ctx, "deploy", None)

    with pytest.raises(DataError):  # bad records: the same
        attempt(ctx, "prep", DataError("data.jsonl line 3: no text"))
    with pytest.raises(DataError, match="not retried"):
        attempt(ctx, "prep", None)

    # a transient error is the retry policy's: the next attempt runs
    with pytest.raises(SourceError):
        attempt(ctx, "fetch_model", SourceError("hub offline"))
    attempt(ctx, "fetch_model", None)
    # another stage of the run, the same stage in another run (a resume with the input changed), and a
    # CLI command (no KFP run) are not affected
    attempt(ctx, "evaluate", None)
    attempt(StageContext(off, str(tmp_path), kfp_run_id="run-2"), "deploy", None)
    cli = StageContext(off, str(tmp_path))
    with pytest.raises(ConfigError):
        attempt(cli, "serve", ConfigError("bad"))
    attempt(cli, "serve", None)
    assert entered.count("deploy") == 2 and entered.count("serve") == 2


def test_from_param_keeps_the_kfp_run_id(tmp_path: Path, monkeypatch) -> None:
    from kubellm.stages import KFP_RUN_ENV

    monkeypatch.setenv(KFP_RUN_ENV, "lifecycle-1")
    assert StageContext.from_param({"enabled": False}, str(tmp_path)).kfp_run_id == "lifecycle-1"
    assert (
        StageContext.for_command(
            StageContext.from_param({"enabled": False}, str(tmp_path)).tracking, str(tmp_path)
        ).kfp_run_id
        is None
    )
