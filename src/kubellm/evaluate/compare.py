"""Comparing evaluated models beside the gate: a candidate against the champion, sweep trials with
each other. Pure functions over evaluation metrics; the stages fetch and evaluate the models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: Metrics shown when a candidate meets the champion, in this order.
CHAMPION_METRICS = ("perplexity", "rouge_l", "token_f1")


def beats_champion(candidate: Mapping[str, float], champion: Mapping[str, float]) -> bool:
    """Lower held-out perplexity and, where both were scored on generation, ROUGE-L not worse."""
    better_ppl = candidate["perplexity"] < champion["perplexity"]
    rouge_ok = "rouge_l" not in candidate or candidate["rouge_l"] >= champion.get("rouge_l", 0.0)
    return better_ppl and rouge_ok


def rank_trials(trials: Sequence[tuple[bool, float | None]], mode: str) -> int | None:
    """Index of the best trial (``(gate passed, metric)`` each) among those whose gate passed; None if
    none did. ``mode`` ``min``: lower is better; ``max``: higher."""
    eligible = [(i, v) for i, (ok, v) in enumerate(trials) if ok and isinstance(v, int | float)]
    if not eligible:
        return None
    return (min if mode == "min" else max)(eligible, key=lambda iv: iv[1])[0]
