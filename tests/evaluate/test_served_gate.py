"""The benchmark gate on the served model: the deploy step scores the real predictor (started on
127.0.0.1 here, the canary on a cluster) with lm-eval's local-completions on the evaluation's tasks,
and keeps the alias where it is when the served model scores below its evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kubellm.config import load_config
from kubellm.config.evaluate import BenchmarkConfig, EvalConfig, GateConfig
from kubellm.errors import ServingError
from kubellm.evaluate.run import evaluate
from kubellm.stages import StageContext, registry
from kubellm.stages import deploy as stage
from kubellm.tracking.registry import champion_info


@pytest.mark.slow
@pytest.mark.integration
def test_served_benchmarks_gate_the_promotion(base_dir: Path, instruct_data: Path, tmp_path: Path) -> None:
    eval_cfg = EvalConfig(
        num_prompts=2,
        max_new_tokens=8,
        seed=3,
        benchmarks=[BenchmarkConfig(task="kubellm_choice", limit=12)],
        gate=GateConfig(
            max_perplexity_ratio=None, max_empty_answer_rate=None, max_generation_drop=None, max_benchmark_drop=None
        ),
    )
    evaluated = evaluate(eval_cfg, base_dir, instruct_data, tmp_path / "evaluation")
    acc = evaluated.metrics["bench.kubellm_choice.acc"]
    cfg = load_config(
        None,
        [
            f"workdir={tmp_path}",
            "tracking.registered_model=gated",
            "deploy.smoke_max_tokens=2",
            "deploy.storage_uri=pvc://models/gated",
            "deploy.playground=false",
            "deploy.max_served_benchmark_drop=0",
        ],
    )
    ctx = StageContext(cfg.tracking, str(tmp_path))
    uri = registry.register(base_dir, ctx).values["uri"]
    args = dict(target="local", model_uri=uri, eval_config=eval_cfg, data_dir=instruct_data)

    out = stage.deploy(cfg, tmp_path / "deploy", ctx, evaluation_dir=tmp_path / "evaluation", **args)
    assert out.values["status"] == "verified"
    assert "kubellm_choice.acc: served" in out.report_md and "pass" in out.report_md  # same fp32 model: same score
    assert champion_info(cfg.tracking, tmp_path).version == 1

    # An evaluation that claims more than the served model delivers: the gate fails, nothing moves.
    claimed = tmp_path / "claimed"
    shutil.copytree(tmp_path / "evaluation", claimed)
    doc = json.loads((claimed / "metrics.json").read_text())
    doc["metrics"]["bench.kubellm_choice.acc"] = min(1.0, acc + 0.25)
    (claimed / "metrics.json").write_text(json.dumps(doc))
    uri2 = registry.register(base_dir, ctx).values["uri"]
    with pytest.raises(ServingError, match=r"scores below its evaluation: kubellm_choice.acc: served"):
        stage.deploy(cfg, tmp_path / "deploy2", ctx, evaluation_dir=claimed, **{**args, "model_uri": uri2})
    assert champion_info(cfg.tracking, tmp_path).version == 1


@pytest.mark.slow
@pytest.mark.integration
def test_served_gate_scores_an_adapter_release_by_name(
    base_dir: Path, adapter_dir: Path, instruct_data: Path, tmp_path: Path
) -> None:
    """``deploy.runtime: llm-inference-service`` (here without a cluster): the gate's lm-eval requests name
    the candidate adapter (``<alias>-v<N>``) on the predictor serving the base with the adapter on it; the
    base answers only to its own name there, so a gate asking for anything else would fail the step."""
    eval_cfg = EvalConfig(
        num_prompts=2,
        max_new_tokens=8,
        seed=3,
        benchmarks=[BenchmarkConfig(task="kubellm_choice", limit=12)],
        gate=GateConfig(
            max_perplexity_ratio=None, max_empty_answer_rate=None, max_generation_drop=None, max_benchmark_drop=None
        ),
    )
    evaluated = evaluate(eval_cfg, adapter_dir, instruct_data, tmp_path / "evaluation")
    cfg = load_config(
        None,
        [
            f"workdir={tmp_path}",
            "tracking.registered_model=gated",
            "deploy.smoke_max_tokens=2",
            "deploy.runtime=llm-inference-service",
            "deploy.playground=false",
            "deploy.max_served_benchmark_drop=0",
            "serve.precision=fp32",
        ],
    )
    ctx = StageContext(cfg.tracking, str(tmp_path))
    uri = registry.register(adapter_dir, ctx, base_model=base_dir).values["uri"]
    out = stage.deploy(
        cfg,
        tmp_path / "deploy",
        ctx,
        target="local",
        model_uri=uri,
        eval_config=eval_cfg,
        data_dir=instruct_data,
        evaluation_dir=tmp_path / "evaluation",
    )
    assert out.values["status"] == "verified", out.values["detail"]
    acc = evaluated.metrics["bench.kubellm_choice.acc"]
    assert f"kubellm_choice.acc: served {acc:.4g} vs evaluated {acc:.4g}" in out.report_md, out.report_md
    assert "--adapter gated-v1=models:/gated/1" in out.values["detail"]
    assert champion_info(cfg.tracking, tmp_path).version == 1


def test_a_prompt_limit_the_gate_cannot_fit_is_refused_before_the_model_loads(
    instruct_data: Path, tmp_path: Path
) -> None:
    """serve.max_prompt_tokens against the gate's own questions (known once the data is prepared), at the
    deploy stage's start: one line naming both settings instead of lm-eval's AssertionError after the
    predictor started. No model is involved: the deploy stage is given none."""
    from kubellm.errors import ConfigError

    eval_cfg = EvalConfig(max_new_tokens=8, benchmarks=[BenchmarkConfig(task="kubellm_choice", limit=12)])
    cfg = load_config(None, [f"workdir={tmp_path}", "tracking.enabled=false", "serve.max_prompt_tokens=6"])
    ctx = StageContext(cfg.tracking, str(tmp_path), kfp_run_id="lifecycle-1")  # as the pipeline's deploy task
    with pytest.raises(
        ConfigError,
        match=r"^serve.max_prompt_tokens=6 is too small for the served benchmark gate: "
        r"kubellm_choice's answers run to (\d+) tokens \(cut at "
        r"evaluate.max_new_tokens=8\).*set serve.max_prompt_tokens >= \d+",
    ):
        stage.deploy(
            cfg,
            tmp_path / "deploy",
            ctx,
            target="local",
            eval_config=eval_cfg,
            data_dir=instruct_data,
            evaluation_dir=tmp_path / "evaluation",
        )
    assert not (tmp_path / "deploy" / "inferenceservice.yaml").exists()  # refused before anything was written
    # the task's retry meets the same input: refused at the stage's entrance, with why it is not tried again
    with pytest.raises(ConfigError, match=r"^serve.max_prompt_tokens=6 is too small.*\(not retried: "):
        stage.deploy(
            cfg,
            tmp_path / "deploy",
            ctx,
            target="local",
            eval_config=eval_cfg,
            data_dir=instruct_data,
            evaluation_dir=tmp_path / "evaluation",
        )
    # a limit above max_new_tokens + 1 always fits (decided without the data); with the gate off, no check
    fits = load_config(None, [f"workdir={tmp_path}", "tracking.enabled=false", "serve.max_prompt_tokens=10"])
    assert stage._BenchmarkGate.create(fits, eval_cfg, tmp_path / "evaluation", instruct_data) is not None
    off = load_config(
        None,
        [f"workdir={tmp_path}", "tracking.enabled=false", "serve.max_prompt_tokens=6", "deploy.benchmark_gate=false"],
    )
    assert stage._BenchmarkGate.create(off, eval_cfg, tmp_path / "evaluation", instruct_data) is None
