"""Text-generation metrics: exact match, token F1 and ROUGE-L, in plain Python.

Our held-out answers are often code (docstring → function), so the tokenization keeps punctuation:
a token is a run of word characters or a single other non-space character, lower-cased
(``def f(x):`` → ``def f ( x ) :``). Dropping punctuation, as SQuAD-style normalisation does, would make
``f(x)`` and ``f x`` equal. Exact match compares whitespace-normalised text, case-sensitively.

Both empty → 1.0 (nothing was expected and nothing was said); exactly one empty → 0.0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased word runs and single punctuation characters."""
    return _TOKEN.findall(text.lower())


def normalize(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the whitespace-normalised texts are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bags of tokens (each token counted as often as it occurs in both)."""
    pred, ref = tokenize(prediction), tokenize(reference)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    return _f1(overlap, len(pred), len(ref))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (two-row dynamic programme, O(len(a)·len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common token subsequence over the prediction (precision) and the
    reference (recall), combined with equal weight (β = 1, as the ``rouge-score`` package reports)."""
    pred, ref = tokenize(prediction), tokenize(reference)
    return _f1(lcs_length(pred, ref), len(pred), len(ref))


def score(prediction: str, reference: str) -> dict[str, float]:
    """All three metrics of one prediction."""
    return {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference),
            "rouge_l": rouge_l(prediction, reference)}


def mean_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Each metric averaged over the examples (every example weighs the same)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    rows = [score(p, r) for p, r in zip(predictions, references, strict=True)]
    return {k: sum(row[k] for row in rows) / len(rows) for k in rows[0]}
