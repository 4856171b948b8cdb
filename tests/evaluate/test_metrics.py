"""Generation metrics, code parsing included, on examples worked out by hand."""

from __future__ import annotations

import pytest

from kubellm.evaluate.metrics import (
    code_parses,
    exact_match,
    extract_code,
    is_code,
    lcs_length,
    mean_scores,
    rouge_l,
    token_f1,
    tokenize,
)


def test_tokenize_keeps_punctuation_as_tokens() -> None:
    assert tokenize("def f(x):\n    return X+1") == ["def", "f", "(", "x", ")", ":", "return", "x", "+", "1"]


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("  a  b\n c ", "a b c", 1.0),  # whitespace is normalised
        ("A b c", "a b c", 0.0),  # case is not (code is case-sensitive)
        ("a b", "a b c", 0.0),
    ],
)
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
    assert got == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5, "empty_answer_rate": 0.0}
    assert mean_scores([], []) == {}
    with pytest.raises(ValueError):
        mean_scores(["a"], [])


def test_mean_scores_with_code() -> None:
    # 4 answers to "write f": one right, one fenced in prose, one cut off mid-block, one empty
    answers = [
        "def f(x):\n    return x",
        "Here it is:\n```python\ndef f(x):\n    return x\n```\nDone.",
        "def f(x):\n    return (x",
        "  \n",
    ]
    got = mean_scores(answers, ["def f(x):\n    return x"] * 4, code=True)
    assert got["code_parse_rate"] == 0.5  # the first two
    assert got["empty_answer_rate"] == 0.25  # the last
    assert got["exact_match"] == 0.25


FENCED = "Sure.\n```python\nx = [1,\n     2]\n```\nand ```inline``` text"


@pytest.mark.parametrize(
    ("answer", "code", "parses"),
    [
        ("def f():\n    return 1", "def f():\n    return 1", 1.0),  # the whole answer
        (FENCED, "x = [1,\n     2]\n", 1.0),  # the first fenced block, prose ignored
        ("```py\nfor i in range(3):\n    print(i)", "for i in range(3):\n    print(i)", 1.0),  # unclosed fence
        ("```\nfor i in range(3):\n", "for i in range(3):\n", 0.0),  # cut off before the loop's body
        ("self self self", "self self self", 0.0),  # the gibberish the old default produced
        ("", "", 0.0),  # ast.parse("") succeeds: empty never counts
        ("```python\n```", "", 0.0),  # an empty block
        ("x = 1\x00", "x = 1\x00", 0.0),  # ast.parse raises ValueError, not SyntaxError
        ("The answer is 42.", "The answer is 42.", 0.0),
        ("#\n#\n#\n#", "#\n#\n#\n#", 0.0),  # comments only: parses, but is no code
        ("print(x)", "print(x)", 0.0),  # a lone expression is not an answer's code
    ],
)
def test_code_parses(answer: str, code: str, parses: float) -> None:
    assert extract_code(answer) == code
    assert code_parses(answer) == parses


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("def f():\n    pass", True),
        ("@cache\ndef f(): ...", True),
        ("x = 1", True),
        ("import os", True),
        ("42", False),
        ("yes", False),
        ("print(x)", False),  # a lone expression is not taken for code
        ("one two three", False),
        ("", False),
    ],
)
def test_is_code(reference: str, expected: bool) -> None:
    assert is_code(reference) is expected
