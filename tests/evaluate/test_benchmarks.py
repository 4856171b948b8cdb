"""Benchmarks through the real lm-evaluation-harness: kubellm's local tasks, scores side by side, the
gate on them, and an empty-answering model refused by the default gate."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kubellm.config.evaluate import BenchmarkConfig, EvalConfig, GateConfig
from kubellm.errors import KubellmError
from kubellm.evaluate.benchmarks import choice_rows, write_local_tasks
from kubellm.evaluate.run import EvalResult, evaluate
from kubellm.tracking.base import NullTracker


def test_choice_rows_hold_the_answer_among_distinct_distractors() -> None:
    prompts = [f"p{i}" for i in range(6)]
    refs = ["a", "b", "c", "d", "a", "e"]  # "a" twice: never its own distractor
    rows = choice_rows(prompts, refs, seed=7)
    assert [r["prompt"] for r in rows] == prompts
    for row, ref in zip(rows, refs, strict=True):
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert row["choices"][row["label"]] == ref and row["choices"].count(ref) == 1
    assert choice_rows(prompts, refs, seed=7) == rows  # seeded
    assert choice_rows(prompts, refs, seed=8) != rows
    assert choice_rows(prompts[:3], refs[:3], seed=7)[0]["choices"] != rows[0]["choices"]  # fewer distractors
    assert choice_rows(["p", "q"], ["same", "same"], seed=0) == []  # no distinct other answer: no question


def test_local_tasks_are_valid_lm_eval_tasks(instruct_data: Path, tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    from kubellm.data.format import open_prepared

    prepared = open_prepared(instruct_data)
    heldout, tok = prepared.heldout(), prepared.load_tokenizer()
    write_local_tasks(
        ["kubellm_choice", "kubellm_complete"], heldout, tok, tmp_path, stop_ids=[0, 5], max_new_tokens=12, seed=0
    )
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False).load(
        ["kubellm_choice", "kubellm_complete"]
    )["tasks"]
    choice, complete = tasks["kubellm_choice"], tasks["kubellm_complete"]
    docs = list(choice.test_docs())
    assert len(docs) == len(heldout) > 3
    first = heldout[0]
    prompt = tok.apply_chat_template(first["messages"], add_generation_prompt=True, tokenize=False)
    assert choice.doc_to_text(docs[0]) == prompt and prompt.endswith("<|assistant|>")
    assert choice.doc_to_choice(docs[0])[choice.doc_to_target(docs[0])] == first["reference"]
    assert choice.config.output_type == "multiple_choice" and choice.config.target_delimiter == ""
    assert complete.config.output_type == "generate_until"
    assert complete.config.generation_kwargs["eos_token_id"] == [0, 5]
    assert complete.config.generation_kwargs["max_gen_toks"] == 12
    assert complete.doc_to_target(next(iter(complete.test_docs()))) == first["reference"]
    assert complete.process_results({"reference": "def f(): pass"}, ["def f(): pass"]) == {
        "exact_match": 1.0,
        "rouge_l": 1.0,
        "code_parse_rate": 1.0,
    }


def _choice_acc_by_hand(model_dir: Path, data_dir: Path, limit: int, seed: int, max_new_tokens: int) -> float:
    """Accuracy on kubellm_choice computed without lm-eval: one unpadded forward pass per choice, the
    choice's summed token log-probabilities given the prompt, the best choice against the label."""
    import torch

    from kubellm.data.format import open_prepared
    from kubellm.models.causal_lm import load_causal_lm

    prepared = open_prepared(data_dir)
    tok = prepared.load_tokenizer()
    heldout = prepared.heldout()
    prompts = [tok.apply_chat_template(ex["messages"], add_generation_prompt=True, tokenize=False) for ex in heldout]
    cut = [tok.decode(tok(ex["reference"], add_special_tokens=False)["input_ids"][:max_new_tokens]) for ex in heldout]
    model = load_causal_lm(model_dir, device="cpu").model.eval()
    right = 0
    rows = choice_rows(prompts, cut, seed)[:limit]
    with torch.no_grad():
        for row in rows:
            scores = []
            for choice in row["choices"]:
                ctx = tok(row["prompt"], add_special_tokens=False)["input_ids"]
                whole = tok(row["prompt"] + choice, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
                scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
            right += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    return right / len(rows)


@pytest.mark.slow
def test_benchmarks_side_by_side_match_an_independent_computation(
    adapter_dir: Path, base_dir: Path, instruct_data: Path, tmp_path: Path
) -> None:
    tracker = NullTracker()
    cfg = EvalConfig(
        num_prompts=4,
        max_new_tokens=8,
        seed=3,
        benchmarks=[
            BenchmarkConfig(task="kubellm_choice", limit=12),
            BenchmarkConfig(task="kubellm_complete", limit=4),
        ],
        gate=GateConfig(
            max_perplexity_ratio=None,
            max_empty_answer_rate=None,
            max_generation_drop=None,
            max_benchmark_drop=100.0,
            min_benchmark={"kubellm_choice.acc": 0.0},
        ),
    )
    res = evaluate(cfg, adapter_dir, instruct_data, tmp_path / "out", base_model=base_dir, tracker=tracker)
    m = res.metrics
    keys = [
        "bench.kubellm_choice.acc",
        "bench.kubellm_choice.acc_norm",
        "bench.kubellm_complete.exact_match",
        "bench.kubellm_complete.rouge_l",
        "bench.kubellm_complete.code_parse_rate",
    ]
    assert sorted(k for k in m if "bench." in k) == sorted(keys + [f"base_{k}" for k in keys])
    # the harness's log-likelihood scores equal a plain computation, for the adapter and for its base
    assert m["bench.kubellm_choice.acc"] == pytest.approx(_choice_acc_by_hand(adapter_dir, instruct_data, 12, 3, 8))
    assert m["base_bench.kubellm_choice.acc"] == pytest.approx(_choice_acc_by_hand(base_dir, instruct_data, 12, 3, 8))
    assert all(0.0 <= m[k] <= 1.0 for k in m if "bench." in k)
    # gate lines for every higher-is-better score, and the floor
    assert sum(r.startswith("max_benchmark_drop: bench.") for r in res.reasons) == len(keys)
    assert "min_benchmark: bench.kubellm_choice.acc" in res.reasons[-1]
    # report, metrics.json (read back through EvalResult.read) and the tracker carry them
    report = res.report_path.read_text()
    assert (
        f"| bench.kubellm_choice.acc | {m['base_bench.kubellm_choice.acc']:.4g} | "
        f"{m['bench.kubellm_choice.acc']:.4g} | lm-eval kubellm_choice: acc |"
    ) in report
    back = EvalResult.read(tmp_path / "out")
    assert back.metrics == pytest.approx(m) and back.reasons == res.reasons and back.passed == res.passed
    assert tracker.last("base_bench.kubellm_choice.acc") == m["base_bench.kubellm_choice.acc"]
    assert not any(p.name.startswith("kubellm-bench-") for p in Path(tmp_path).iterdir())


def test_empty_answering_model_is_refused_by_the_default_gate(
    silent_dir: Path, speaker_dir: Path, instruct_data: Path, tmp_path: Path
) -> None:
    # the default gate, perplexity bound at "no worse than the base" (two random models: neither improves)
    cfg = EvalConfig(num_prompts=8, max_new_tokens=6, gate=GateConfig(max_perplexity_ratio=1.0))
    res = evaluate(cfg, silent_dir, instruct_data, tmp_path / "out", base_model=speaker_dir)
    assert res.metrics["empty_answer_rate"] == 1.0 and res.metrics["base_empty_answer_rate"] == 0.0
    assert all(s["candidate"] == "" and s["base"] for s in res.samples)
    assert res.reasons[0].startswith("max_perplexity_ratio: perplexity_ratio") and res.reasons[0].endswith(": pass")
    assert "max_empty_answer_rate: empty_answer_rate 1 <= 0.5: FAIL" in res.reasons
    assert not res.passed and "**Gate: FAILED**" in res.report_path.read_text()
    # the model it was made from, against itself: answers, regresses in nothing, passes the same gate
    same = evaluate(cfg, speaker_dir, instruct_data, tmp_path / "same", base_model=speaker_dir)
    assert same.passed, same.reasons


@pytest.mark.slow
def test_unknown_task_is_one_line_before_any_model_is_loaded(instruct_data: Path, tmp_path: Path) -> None:
    not_a_model = tmp_path / "model"
    not_a_model.mkdir()  # loading it would fail with another message: the task check comes first
    cfg = EvalConfig(benchmarks=[BenchmarkConfig(task="kubellm_choise")])
    with pytest.raises(KubellmError) as err:
        evaluate(cfg, not_a_model, instruct_data, tmp_path / "out")
    assert str(err.value).startswith(
        "evaluate.benchmarks[0].task: unknown task 'kubellm_choise' (kubellm's local "
        "tasks: kubellm_choice, kubellm_complete; lm-eval 0.4.13 has "
    )
    assert "did you mean kubellm_choice" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_local_task_needs_instruction_data(base_dir: Path, tmp_path: Path) -> None:
    from kubellm.config.data import DataConfig
    from kubellm.data.prepare import prepare

    src = tmp_path / "code.jsonl"
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=5)) for _ in range(100)]
    src.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=40))}) + "\n" for _ in range(200)))
    data = prepare(
        DataConfig.model_validate(
            {
                "kind": "pretrain",
                "sources": [{"uri": str(src)}],
                "block_size": 16,
                "tokenizer": {"vocab_size": 300},
                "split": {"validation_fraction": 0.2},
                "cleaning": {"min_chars": 1},
            }
        ),
        tmp_path / "prepared",
    ).path
    with pytest.raises(
        KubellmError,
        match=r"evaluate.benchmarks: kubellm_choice is made from held-out instruction "
        r"examples and .* has 0",
    ):
        evaluate(EvalConfig(benchmarks=[BenchmarkConfig(task="kubellm_choice")]), base_dir, data, tmp_path / "out")
