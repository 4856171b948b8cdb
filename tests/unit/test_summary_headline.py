"""The run summary's headline: the line a person reads first after `make run`."""

from __future__ import annotations

from types import SimpleNamespace

from kubellm.summary import _closed_by, headline
from kubellm.tracking.base import CLOSES_TAG


def _summary(metrics: dict, gate: bool | None = True, model: dict | None = None) -> dict:
    return {
        "pipeline": "llm-lifecycle",
        "run_name": "local-1",
        "status": "FINISHED",
        "failed_stage": None,
        "evaluation": {"gate_passed": gate, "metrics": metrics},
        "model": model,
    }


def test_headline_shows_perplexity_and_the_code_metric_against_the_base() -> None:
    line = headline(
        _summary(
            {"perplexity": 26.2, "base_perplexity": 79.96, "code_parse_rate": 0.15625, "base_code_parse_rate": 0.0},
            model={"name": "kubellm-local", "version": 1, "aliases": ["candidate", "champion"]},
        )
    )
    assert line == (
        "llm-lifecycle local-1: FINISHED; gate passed (perplexity 26.2 vs base 80; answers that are "
        "Python code 16% vs base 0%); model kubellm-local v1 [candidate, champion]"
    )


def test_headline_shows_what_an_adapter_version_stores_beside_a_merged_copy() -> None:
    from kubellm.tracking.registry import storage_figures

    tags = {
        "kind": "adapter",
        "base_name": "kubellm-local-base",
        "base_version": "1",
        "storage_bytes": str(1_200_000),
        "merged_storage_bytes": str(5_000_000),
    }
    model = {"name": "kubellm-local", "version": 2, "aliases": ["candidate"], **storage_figures(tags)}
    assert model["storage_factor"] == 4.17 and model["base"] == "models:/kubellm-local-base/1"
    assert headline(_summary({}, gate=None, model=model)).endswith(
        "model kubellm-local v2 [candidate]: adapter 1.14 MiB vs 4.77 MiB merged (4.17x less), on "
        "models:/kubellm-local-base/1"
    )
    merged = storage_figures({"adapter": "true", "storage_bytes": "5000000"})
    assert merged == {"kind": "merged", "storage_bytes": 5_000_000}


def test_headline_without_a_code_metric_or_a_gate() -> None:
    assert headline(_summary({"perplexity": 310.0, "base_perplexity": 520.0}, gate=False)) == (
        "llm-lifecycle local-1: FINISHED; gate failed; perplexity 310 vs base 520"
    )
    assert headline(_summary({}, gate=None)) == "llm-lifecycle local-1: FINISHED"


def test_a_failed_gate_names_the_rule_before_the_figures_that_improved() -> None:
    summary = _summary({"perplexity": 544.0, "base_perplexity": 1130.0}, gate=False)
    summary["evaluation"]["gate_failure"] = "gate failed on empty_answer_rate 0.913 (needs <= 0.5)"
    assert headline(summary) == (
        "llm-lifecycle local-1: FINISHED; gate failed on empty_answer_rate 0.913 "
        "(needs <= 0.5); perplexity 544 vs base 1.13e+03"
    )


def test_a_run_closed_before_evaluation_says_why() -> None:
    summary = _summary({}, gate=None)
    summary["closed_by"] = "data unchanged since champion v3 was trained (fingerprint ab12): nothing to do"
    assert headline(summary).endswith(
        "; data unchanged since champion v3 was trained (fingerprint ab12): nothing to do"
    )


def _run(stage: str, tags: dict | None = None, metrics: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(tags={"stage": stage, **(tags or {})}, metrics=metrics or {}))


def test_stages_that_did_not_run_say_which_stage_closed_the_run() -> None:
    gate = _run("evaluate", {CLOSES_TAG: "gate failed on perplexity_ratio 1.2 (needs <= 0.95)"})
    assert _closed_by([_run("prepare"), gate]) == "gate failed on perplexity_ratio 1.2 (needs <= 0.95)"
    assert _closed_by([_run("prepare"), _run("evaluate")]) is None
    trials = [
        _run(f"evaluate.trial-{i}", {CLOSES_TAG: f"gate failed on rule {i}"}, {"gate_passed": 0.0}) for i in (1, 2)
    ]
    assert _closed_by(trials) == (
        "no trial passed the gate (evaluate.trial-1: gate failed on rule 1; evaluate.trial-2: gate failed on rule 2)"
    )
    passed = _run("evaluate.trial-3", metrics={"gate_passed": 1.0})
    assert _closed_by([*trials, passed]) is None
