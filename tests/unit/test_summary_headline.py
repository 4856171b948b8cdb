"""The run summary's headline: the line a person reads first after `make run`."""

from __future__ import annotations

from kubellm.summary import headline


def _summary(metrics: dict, gate: bool | None = True, model: dict | None = None) -> dict:
    return {"pipeline": "llm-lifecycle", "run_name": "local-1", "status": "FINISHED", "failed_stage": None,
            "evaluation": {"gate_passed": gate, "metrics": metrics}, "model": model}


def test_headline_shows_perplexity_and_the_code_metric_against_the_base() -> None:
    line = headline(_summary({"perplexity": 26.2, "base_perplexity": 79.96, "code_parse_rate": 0.15625,
                              "base_code_parse_rate": 0.0},
                             model={"name": "kubellm-local", "version": 1, "aliases": ["candidate", "champion"]}))
    assert line == ("llm-lifecycle local-1: FINISHED; gate passed (perplexity 26.2 vs base 80; answers that are "
                    "Python code 16% vs base 0%); model kubellm-local v1 [candidate, champion]")


def test_headline_without_a_code_metric_or_a_gate() -> None:
    assert headline(_summary({"perplexity": 310.0, "base_perplexity": 520.0}, gate=False)) == (
        "llm-lifecycle local-1: FINISHED; gate failed (perplexity 310 vs base 520)")
    assert headline(_summary({}, gate=None)) == "llm-lifecycle local-1: FINISHED"
