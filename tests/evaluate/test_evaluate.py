"""evaluate(): perplexity against an independent computation, generation, the gate, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kubellm.config.evaluate import EvalConfig, GateConfig
from kubellm.evaluate.run import EvalResult, evaluate, generate_answers
from kubellm.fsutil import mark_output
from kubellm.tracking.base import CLOSES_TAG, GATE_RULES_TAG, NullTracker


def _by_hand_perplexity(model_dir: Path, data_dir: Path) -> float:
    """Row by row, no padding, no batching: sum of -log p(label) over labelled positions / count."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubellm.data.format import open_prepared

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in open_prepared(data_dir).load_split("validation"):
            ids = torch.tensor([row["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            targets = torch.tensor(row["labels"][1:])  # position t predicts token t+1
            scored = targets != -100
            nll -= float(logp[:-1][scored, targets[scored]].sum())
            count += int(scored.sum())
    return math.exp(nll / count)


@pytest.mark.slow
def test_perplexity_matches_independent_computation(base_dir: Path, instruct_data: Path, tmp_path: Path) -> None:
    # batch_size 5 over variable-length rows: padding and the attention mask are exercised
    res = evaluate(EvalConfig(batch_size=5, num_prompts=0), base_dir, instruct_data, tmp_path / "out")
    expected = _by_hand_perplexity(base_dir, instruct_data)
    assert res.metrics["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert res.metrics["eval_loss"] == pytest.approx(math.log(expected), rel=1e-4)


@pytest.mark.slow
def test_adapter_against_base_side_by_side(
    adapter_dir: Path, base_dir: Path, instruct_data: Path, tmp_path: Path
) -> None:
    tracker = NullTracker()
    cfg = EvalConfig(
        num_prompts=6,
        max_new_tokens=8,
        num_samples_in_report=2,
        gate=GateConfig(
            max_perplexity_ratio=10.0, max_perplexity=1e6, max_empty_answer_rate=None, max_generation_drop=None
        ),
    )
    res = evaluate(cfg, adapter_dir, instruct_data, tmp_path / "out", base_model=base_dir, tracker=tracker)
    m = res.metrics
    # the base column is the base model itself, not the adapter
    assert m["base_perplexity"] == pytest.approx(_by_hand_perplexity(base_dir, instruct_data), rel=1e-4)
    assert m["perplexity"] != pytest.approx(m["base_perplexity"], rel=1e-3)
    assert m["perplexity_ratio"] == pytest.approx(m["perplexity"] / m["base_perplexity"])
    for key in (
        "rouge_l",
        "token_f1",
        "exact_match",
        "empty_answer_rate",
        "base_rouge_l",
        "base_token_f1",
        "base_exact_match",
        "base_empty_answer_rate",
    ):
        assert 0.0 <= m[key] <= 1.0
    assert "code_parse_rate" not in m  # "repeat: a b" → "a b" is not code: code_metric auto leaves it out
    assert m["num_prompts"] == 6 and len(res.samples) == 6
    assert {"prompt", "reference", "candidate", "base", "rouge_l", "token_f1", "exact_match"} <= set(res.samples[0])
    assert res.passed and len(res.reasons) == 2 and all(r.endswith(": pass") for r in res.reasons)

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [".kubellm-output", "loss_curve.png", "metrics.json", "report.md"]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["passed"] is True and doc["metrics"] == pytest.approx(m) and doc["report_path"] == str(out / "report.md")
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "**Gate: PASSED**" in report and "| max_perplexity_ratio | perplexity_ratio |" in report
    assert "| perplexity | " in report and "![loss curve](loss_curve.png)" in report
    assert report.count("Candidate:") == 2 and report.count("Base:") == 2  # num_samples_in_report
    # tracked: every metric, the gate, and the output folder as an artifact
    assert tracker.last("perplexity_ratio") == pytest.approx(m["perplexity_ratio"])
    assert tracker.last("gate_passed") == 1.0 and tracker.tags["gate"] == "passed"
    assert tracker.artifacts == [(out, "evaluation")]


def test_batched_left_padded_generation_equals_one_by_one(base_dir: Path, instruct_data: Path) -> None:
    from kubellm.data.format import open_prepared
    from kubellm.models.causal_lm import load_causal_lm

    prepared = open_prepared(instruct_data)
    convs = [ex["messages"] for ex in prepared.heldout()[:5]]
    lm = load_causal_lm(base_dir, device="cpu")
    kw = dict(
        max_new_tokens=6,
        stop_ids=[prepared.manifest.eos_token_id],
        pad_id=prepared.manifest.pad_token_id,
        max_positions=64,
        device="cpu",
    )
    batched, n_batched = generate_answers(lm.model, prepared.load_tokenizer(), convs, batch_size=5, **kw)
    single, n_single = generate_answers(lm.model, prepared.load_tokenizer(), convs, batch_size=1, **kw)
    assert batched == single and n_batched == n_single > 0


def test_gate_rule_not_evaluable_without_base(base_dir: Path, instruct_data: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(num_prompts=0, gate=GateConfig(max_perplexity_ratio=0.95, min_rouge_l=0.1, max_perplexity=1e9))
    tracker = NullTracker()
    res = evaluate(cfg, base_dir, instruct_data, tmp_path / "out", tracker=tracker)
    assert not res.passed
    # every rule with its threshold and value, for summary.json; the failed ones in the one line a headline shows
    rules = json.loads(tracker.tags[GATE_RULES_TAG])
    assert rules == res.rules == json.loads((tmp_path / "out" / "metrics.json").read_text())["rules"]
    assert [(r["rule"], r["passed"]) for r in rules] == [
        ("max_perplexity_ratio", False),
        ("max_perplexity", True),
        ("min_rouge_l", False),
        ("max_empty_answer_rate", False),
        ("max_generation_drop", False),
    ]
    assert rules[1]["value"] == pytest.approx(res.metrics["perplexity"]) and rules[1]["threshold"] == 1e9
    assert tracker.tags[CLOSES_TAG].startswith(
        "gate failed on max_perplexity_ratio not evaluable (no base model to compare with: pass --base (base_model))"
    )
    assert "max_perplexity " not in tracker.tags[CLOSES_TAG]  # a passing rule is not named
    assert [r for r in res.reasons if not r.startswith("max_perplexity:")] == [
        "max_perplexity_ratio: not evaluable (no base model to compare with: pass --base (base_model)): FAIL",
        "min_rouge_l: not evaluable (no generation metrics: evaluate.num_prompts is 0): FAIL",
        "max_empty_answer_rate: not evaluable (no generation metrics: evaluate.num_prompts is 0): FAIL",
        "max_generation_drop: not evaluable (no generation metrics: evaluate.num_prompts is 0): FAIL",
    ]
    assert "base_perplexity" not in res.metrics and "rouge_l" not in res.metrics
    assert "**Gate: FAILED**" in res.report_path.read_text()


def test_failure_leaves_previous_output_untouched(
    base_dir: Path, instruct_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}')
    mark_output(out, "evaluation")  # an earlier evaluation: replaceable, but only by a finished one

    def broken_plot(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("kubellm.evaluate.run.plot_loss_curves", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate(EvalConfig(num_prompts=0), base_dir, instruct_data, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    assert (out / "metrics.json").read_text() == '{"old": true}'


def test_no_history_means_no_plot(instruct_data: Path, base_dir: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(base_dir, bare)
    (bare / "history.jsonl").unlink()
    res = evaluate(EvalConfig(num_prompts=0), bare, instruct_data, tmp_path / "out")
    assert res.plot_path is None and not (tmp_path / "out" / "loss_curve.png").exists()
    assert "loss_curve" not in res.report_path.read_text()
    assert isinstance(res, EvalResult)


def test_clear_errors(base_dir: Path, tmp_path: Path) -> None:
    from kubellm.errors import KubellmError

    not_data = tmp_path / "not-data"
    not_data.mkdir()
    with pytest.raises(KubellmError, match="not a prepared dataset"):
        evaluate(EvalConfig(), base_dir, not_data, tmp_path / "out")
    with pytest.raises(KubellmError, match="model directory not found"):
        evaluate(EvalConfig(), tmp_path / "nope", not_data, tmp_path / "out")


def test_adapter_without_base_is_compared_with_its_recorded_base(
    adapter_dir: Path, base_dir: Path, instruct_data: Path, tmp_path: Path
) -> None:
    res = evaluate(
        EvalConfig(
            num_prompts=0,
            gate=GateConfig(max_perplexity_ratio=10.0, max_empty_answer_rate=None, max_generation_drop=None),
        ),
        adapter_dir,
        instruct_data,
        tmp_path / "out",
    )
    assert res.passed and "perplexity_ratio" in res.metrics
    report = res.report_path.read_text()
    assert f"| base | `{base_dir}` |" in report  # adapter_config.json names the base it was trained on
