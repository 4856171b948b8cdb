"""The gate's rules, on both sides of their thresholds, and the benchmark config."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from kubellm.config.evaluate import EvalConfig, GateConfig
from kubellm.evaluate.run import apply_gate

NO_BASE = {"base": "no base model to compare with: pass --base (base_model)"}


def _gate(**rules: object) -> GateConfig:
    """Only ``rules`` set."""
    off = {k: None for k, f in GateConfig.model_fields.items() if f.default is None or isinstance(f.default, float)}
    return GateConfig(**{**off, **rules})


def _reasons(gate: GateConfig, metrics: dict[str, float], **kw: object) -> list[str]:
    return [r.reason() for r in apply_gate(gate, metrics, missing=NO_BASE, **kw)]


# Each rule on its own, on both sides of its threshold (values as evaluate() would report them).
_METRICS = {"perplexity": 20.0, "perplexity_ratio": 0.8, "rouge_l": 0.4, "token_f1": 0.5, "empty_answer_rate": 0.25}


@pytest.mark.parametrize(
    ("rule", "passing", "failing"),
    [
        ("max_perplexity_ratio", 0.8, 0.79),  # ratio 0.8 must be <= threshold
        ("max_perplexity", 20.0, 19.9),
        ("min_rouge_l", 0.4, 0.41),  # rouge_l 0.4 must be >= threshold
        ("min_token_f1", 0.5, 0.51),
        ("max_empty_answer_rate", 0.25, 0.2),  # 2 of 8 answers empty
    ],
)
def test_each_gate_rule_passes_and_fails(rule: str, passing: float, failing: float) -> None:
    ok = apply_gate(_gate(**{rule: passing}), _METRICS, missing={})
    bad = apply_gate(_gate(**{rule: failing}), _METRICS, missing={})
    assert [r.passed for r in ok] == [True] and ok[0].reason().endswith(": pass")
    assert [r.passed for r in bad] == [False] and bad[0].reason().endswith(": FAIL")
    assert bad[0].rule == rule and bad[0].value == _METRICS[bad[0].metric]


def test_gate_nan_fails_and_no_rules_pass() -> None:
    rules = apply_gate(_gate(max_perplexity=100.0), {"perplexity": math.nan}, missing={})
    assert not rules[0].passed
    assert apply_gate(_gate(), {}, missing={}) == []


def test_default_gate_refuses_empty_answers_and_regressions() -> None:
    # a candidate with 5 % lower perplexity whose answers are mostly empty and worse than the base's
    metrics = {
        "perplexity": 9.5,
        "base_perplexity": 10.0,
        "perplexity_ratio": 0.95,
        "rouge_l": 0.1,
        "base_rouge_l": 0.3,
        "token_f1": 0.2,
        "base_token_f1": 0.2,
        "exact_match": 0.0,
        "base_exact_match": 0.0,
        "empty_answer_rate": 0.75,
        "base_empty_answer_rate": 0.0,
    }
    assert _reasons(GateConfig(), metrics) == [
        "max_perplexity_ratio: perplexity_ratio 0.95 <= 0.95: pass",
        "max_empty_answer_rate: empty_answer_rate 0.75 <= 0.5: FAIL",
        "max_generation_drop: exact_match_drop 0 <= 0: pass",
        "max_generation_drop: token_f1_drop 0 <= 0: pass",
        "max_generation_drop: rouge_l_drop 0.2 <= 0: FAIL",
    ]


def test_generation_drop_tolerance_and_float_noise() -> None:
    # equal means computed in different orders differ in the last bits: not a drop
    metrics = {"rouge_l": 0.1 + 0.2, "base_rouge_l": 0.3, "code_parse_rate": 0.5, "base_code_parse_rate": 0.625}
    assert _reasons(_gate(max_generation_drop=0.0), metrics) == [
        "max_generation_drop: rouge_l_drop -5.551e-17 <= 0: pass",
        "max_generation_drop: code_parse_rate_drop 0.125 <= 0: FAIL",
    ]
    assert all(r.passed for r in apply_gate(_gate(max_generation_drop=0.125), metrics, missing={}))


def test_generation_drop_not_evaluable() -> None:
    assert _reasons(_gate(max_generation_drop=0.0), {"rouge_l": 0.3}) == [
        "max_generation_drop: not evaluable (rouge_l: no base model to compare with: pass --base (base_model)): FAIL"
    ]
    no_gen = {"generation": "no generation metrics: pretraining data has no held-out prompts"}
    rules = apply_gate(_gate(max_generation_drop=0.0), {"perplexity": 3.0}, missing=no_gen)
    assert [r.reason() for r in rules] == [
        "max_generation_drop: not evaluable (no generation metrics: pretraining data has no held-out prompts): FAIL"
    ]


def test_benchmark_drop_in_points() -> None:
    metrics = {
        "bench.kubellm_choice.acc": 0.40,
        "base_bench.kubellm_choice.acc": 0.45,
        "bench.kubellm_choice.acc_norm": 0.50,
        "base_bench.kubellm_choice.acc_norm": 0.505,
        "bench.wikitext.word_perplexity": 30.0,
        "base_bench.wikitext.word_perplexity": 20.0,
    }
    # lower-is-better scores (perplexities) are reported, not bounded by the drop rule
    assert _reasons(
        _gate(max_benchmark_drop=1.0), metrics, lower_is_better=frozenset({"bench.wikitext.word_perplexity"})
    ) == [
        "max_benchmark_drop: bench.kubellm_choice.acc_drop 5 <= 1: FAIL",
        "max_benchmark_drop: bench.kubellm_choice.acc_norm_drop 0.5 <= 1: pass",
    ]
    assert _reasons(_gate(max_benchmark_drop=1.0), {"bench.kubellm_choice.acc": 0.4}) == [
        "max_benchmark_drop: not evaluable (bench.kubellm_choice.acc: no base model to compare with: "
        "pass --base (base_model)): FAIL"
    ]
    assert _reasons(_gate(max_benchmark_drop=1.0), {}) == []  # no benchmark configured: no rule


def test_min_benchmark_floor() -> None:
    metrics = {"bench.kubellm_choice.acc": 0.4}
    assert _reasons(_gate(min_benchmark={"kubellm_choice.acc": 0.4}), metrics) == [
        "min_benchmark: bench.kubellm_choice.acc 0.4 >= 0.4: pass"
    ]
    assert _reasons(_gate(min_benchmark={"kubellm_choice.acc": 0.5}), metrics) == [
        "min_benchmark: bench.kubellm_choice.acc 0.4 >= 0.5: FAIL"
    ]
    assert _reasons(_gate(min_benchmark={"kubellm_choice.f1": 0.5}), metrics) == [
        "min_benchmark: not evaluable (bench.kubellm_choice.f1 was not measured (measured: kubellm_choice.acc)): FAIL"
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"benchmarks": [{"task": "kubellm_choice", "limit": 0}]}, "greater than or equal to 1"),
        ({"benchmarks": [{"task": "kubellm_choice", "num_fewshot": -1}]}, "greater than or equal to 0"),
        ({"benchmarks": [{"task": "kubellm_choice", "shots": 5}]}, "Extra inputs are not permitted"),
        ({"benchmarks": [{"task": "../etc"}]}, "should match pattern"),
        ({"benchmarks": [{"task": "arc_easy"}, {"task": "arc_easy"}]}, "task 'arc_easy' is listed twice"),
        (
            {"benchmarks": [{"task": "arc_easy"}], "gate": {"min_benchmark": {"kubellm_choice.acc": 0.3}}},
            "names task 'kubellm_choice', which is not in evaluate.benchmarks (arc_easy)",
        ),
        ({"gate": {"min_benchmark": {"acc": 0.3}}}, "'acc' is not <task>.<metric>"),
        ({"gate": {"max_benchmark_drop": -1}}, "greater than or equal to 0"),
        ({"code_metric": "yes"}, "'auto', 'on' or 'off'"),
    ],
)
def test_bad_benchmark_config(raw: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EvalConfig.model_validate(raw)
