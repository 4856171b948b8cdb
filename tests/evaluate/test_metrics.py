"""Generation metrics on examples worked out by hand."""

from __future__ import annotations

import pytest

from kubellm.train.metrics import exact_match, lcs_length, mean_scores, rouge_l, token_f1, tokenize


def test_tokenize_keeps_punctuation_as_tokens() -> None:
    assert tokenize("def f(x):\n    return X+1") == ["def", "f", "(", "x", ")", ":", "return", "x", "+", "1"]


@pytest.mark.parametrize(("pred", "ref", "expected"), [
    ("  a  b\n c ", "a b c", 1.0),   # whitespace is normalised
    ("A b c", "a b c", 0.0),         # case is not (code is case-sensitive)
    ("a b", "a b c", 0.0),
])
def test_exact_match(pred: str, ref: str, expected: float) -> None:
    assert exact_match(pred, ref) == expected


def test_token_f1_worked_example() -> None:
    # pred: the cat sat on the mat / ref: the cat is on the mat
    # shared bag: the×2, cat, on, mat = 5 of 6 each → P = R = 5/6 → F1 = 5/6
    assert token_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # repeated tokens count only as often as they occur in both: pred "a a a b", ref "a b b"
    # overlap = min(3,1) + min(1,2) = 2; P = 2/4, R = 2/3 → F1 = 2·(1/2·2/3)/(1/2+2/3) = 4/7
    assert token_f1("a a a b", "a b b") == pytest.approx(4 / 7)


def test_rouge_l_worked_example() -> None:
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5 → 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # order matters for ROUGE-L but not for token F1: reversed 4 tokens → LCS 1 → P = R = 1/4
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)
    assert token_f1("a b c d", "d c b a") == pytest.approx(1.0)
    # pred 2 tokens inside a 4-token ref: LCS 2, P = 1, R = 1/2 → F1 = 2/3
    assert rouge_l("b d", "a b c d") == pytest.approx(2 / 3)


def test_lcs_length_is_symmetric() -> None:
    a, b = list("ABCBDAB"), list("BDCABA")  # the textbook pair: LCS length 4 (e.g. BCBA)
    assert lcs_length(a, b) == lcs_length(b, a) == 4


@pytest.mark.parametrize("metric", [token_f1, rouge_l])
def test_empty_texts(metric) -> None:
    assert metric("", "") == 1.0
    assert metric("", "x") == 0.0
    assert metric("x", "") == 0.0
    assert metric("!!", "??") == 0.0


def test_mean_scores_averages_per_example() -> None:
    got = mean_scores(["a b", "x"], ["a b", "y"])
    assert got == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5}
    assert mean_scores([], []) == {}
    with pytest.raises(ValueError):
        mean_scores(["a"], [])
