"""Log-probabilities in the OpenAI API (issue 13) against an independent ``log_softmax`` of the model's
logits in fp32, and lm-evaluation-harness scoring a multiple-choice task through ``kubellm serve`` exactly
as it scores the same model in-process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kubellm.config import load_config
from kubellm.serve.app import BackgroundServer, build_app, load_model

pytestmark = pytest.mark.integration

TOL = 1e-4
PROMPTS = ["The quick brown fox", "Where is the bird? The bird sings in the green tree by"]


@pytest.fixture(scope="module")
def predictor(tiny_model_dir: Path):
    cfg = load_config(
        None,
        [
            "serve.precision=fp32",
            "serve.max_prompt_tokens=64",
            "serve.max_new_tokens=32",
            "serve.default_max_tokens=8",
            "serve.max_logprobs=5",
        ],
    )
    model = load_model(cfg, str(tiny_model_dir))
    with BackgroundServer(build_app(model)) as server:
        yield server.url, model


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    """``ids -> log_softmax(logits)`` of an independently loaded copy of the model, fp32, batch 1."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def logprobs(ids: list[int]):
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/openai/v1/{path}", json={"model": "kubellm", **body}, timeout=60)


def _check_position(lp, token: int, logprob: float, top: dict[str, float] | list, k: int, token_text) -> None:
    """The served entry of one position against the reference row ``lp`` (log-probs given the prefix)."""
    assert abs(logprob - float(lp[token])) < TOL
    values, ids = lp.topk(k)
    if isinstance(top, dict):  # legacy: top k plus the chosen token
        want = {token_text(i): v for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
        want.setdefault(token_text(token), float(lp[token]))
        got = top
    else:  # chat: exactly the top k, best first
        want = {token_text(i): v for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
        got = {t["token"]: t["logprob"] for t in top}
    assert got.keys() == want.keys() and all(abs(got[t] - want[t]) < TOL for t in want)


def test_completion_logprobs_with_echo_match_log_softmax_for_a_batch(predictor, reference) -> None:
    url, model = predictor
    tok = model.tokenizer
    token_text = lambda i: tok.decode([i])  # noqa: E731
    prompt_ids = [model.encode_prompt(p) for p in PROMPTS]
    # Text prompts and the same prompts as token ids, batched: both give the same scores.
    for prompt in (PROMPTS, prompt_ids):
        resp = _post(
            url, "completions", {"prompt": prompt, "max_tokens": 5, "echo": True, "logprobs": 3, "temperature": 0}
        )
        assert resp.status_code == 200, resp.text
        for choice, ids, text in zip(resp.json()["choices"], prompt_ids, PROMPTS, strict=True):
            lp = choice["logprobs"]
            n = len(ids)
            # The greedy continuation is what plain generation gives; score the whole sequence at once.
            alone = _post(url, "completions", {"prompt": ids, "max_tokens": 5, "temperature": 0}).json()
            assert choice["text"] == text + alone["choices"][0]["text"]
            full = ids + _greedy(model, ids, 5)
            generated = full[n:]
            ref = reference(full)
            assert lp["tokens"] == [token_text(i) for i in full]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            for pos in range(1, len(full)):
                _check_position(
                    ref[pos - 1], full[pos], lp["token_logprobs"][pos], lp["top_logprobs"][pos], 3, token_text
                )
            assert len(generated) == 5 and choice["text"][lp["text_offset"][n] :].startswith(token_text(generated[0]))
            assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def _greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.engine.model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


def test_echo_with_max_tokens_0_scores_only_the_prompt(predictor, reference) -> None:
    url, model = predictor
    ids = model.encode_prompt(PROMPTS[1])
    resp = _post(url, "completions", {"prompt": PROMPTS[1], "max_tokens": 0, "echo": True, "logprobs": 0})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["text"] == PROMPTS[1] and resp.json()["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
    ref = reference(ids)
    total = sum(float(ref[i - 1, ids[i]]) for i in range(1, len(ids)))
    assert math.isclose(sum(lp["token_logprobs"][1:]), total, abs_tol=TOL * len(ids))
    # logprobs 0: only the chosen token in top_logprobs
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    plain = _post(url, "completions", {"prompt": PROMPTS[0], "max_tokens": 0, "echo": True})
    assert plain.status_code == 200 and plain.json()["choices"][0] == {
        "index": 0,
        "text": PROMPTS[0],
        "finish_reason": "length",
        "logprobs": None,
    }


def test_chat_logprobs_match_log_softmax(predictor, reference) -> None:
    url, model = predictor
    messages = [{"role": "user", "content": "Who jumps over the dog?"}]
    resp = _post(
        url,
        "chat/completions",
        {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2},
    )
    assert resp.status_code == 200, resp.text
    content = resp.json()["choices"][0]["logprobs"]["content"]
    ids = model.encode_chat(messages)
    full = ids + _greedy(model, ids, 4)
    ref = reference(full)
    tok = model.tokenizer
    assert [c["token"] for c in content] == [tok.decode([i]) for i in full[len(ids) :]]
    for pos, entry in enumerate(content, start=len(ids)):
        assert entry["bytes"] == list(entry["token"].encode())
        _check_position(ref[pos - 1], full[pos], entry["logprob"], entry["top_logprobs"], 2, lambda i: tok.decode([i]))
    without = _post(url, "chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0})
    assert without.json()["choices"][0]["logprobs"] is None
    assert without.json()["choices"][0]["message"] == resp.json()["choices"][0]["message"]


@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        ("completions", {"prompt": "The cat", "logprobs": 6}, "logprobs", "from 0 to 5"),
        ("completions", {"prompt": "The cat", "logprobs": True}, "logprobs", "integer"),
        ("completions", {"prompt": "The cat", "max_tokens": 0}, "max_tokens", "from 1 to 32"),
        ("completions", {"prompt": "The cat", "echo": True, "logprobs": 1, "stream": True}, "stream", "stream"),
        (
            "completions",
            {"prompt": "The cat " * 40, "echo": True, "logprobs": 1, "max_tokens": 0},
            "prompt",
            "limit of 64",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2},
            "top_logprobs",
            "needs logprobs",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 9},
            "logprobs",
            "from 0 to 5",
        ),
    ],
)
def test_logprob_limits_answer_400(predictor, path: str, body: dict, param: str, fragment: str) -> None:
    resp = _post(predictor[0], path, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and fragment in error["message"]


# --- lm-evaluation-harness ----------------------------------------------------------------------------

QUESTIONS = [
    ("The quick brown fox jumps over the", [" lazy dog.", " green tree.", " mat."], 0),
    ("The cat sits on the", [" river.", " mat and sleeps.", " dog."], 1),
    ("The bird sings in the", [" lazy fox.", " mat.", " green tree by the river."], 2),
    ("Who jumps over the dog?", [" The quick brown fox.", " The cat.", " The bird."], 0),
    ("What does the cat do?", [" It sings.", " It sleeps all day.", " It jumps."], 1),
    ("Where is the bird?", [" On the mat.", " Over the dog.", " In the green tree."], 2),
    ("You are a helpful assistant.", [" Answer in one short sentence.", " The lazy dog.", " The mat."], 0),
    ("The lazy dog sleeps by the", [" quick fox.", " river.", " bird sings."], 1),
]


def _task_dir(tmp_path: Path) -> Path:
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    task = tmp_path / "tasks"
    task.mkdir()
    (task / "kubellm_mc.yaml").write_text(f"""\
task: kubellm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return task


def _scores(results: dict) -> tuple[dict[str, float], list[list[float]]]:
    metrics = results["results"]["kubellm_mc"]
    samples = sorted(results["samples"]["kubellm_mc"], key=lambda s: s["doc_id"])
    return (
        {k: metrics[f"{k},none"] for k in ("acc", "acc_norm")},
        [[float(r[0][0]) for r in s["resps"]] for s in samples],
    )


@pytest.mark.slow
def test_lm_eval_scores_the_served_model_as_it_scores_the_model_in_process(
    tiny_model_dir: Path, tmp_path: Path, start_serve, monkeypatch
) -> None:
    """``lm_eval --model local-completions`` against ``kubellm serve`` (log-likelihoods through ``echo`` +
    ``logprobs``) and lm-eval's ``hf`` model on the same directory give the same accuracies.

    Tolerance: accuracies must be equal; each choice's log-likelihood within 1e-4 (both fp32; the server
    and lm-eval pad batches differently, which changes fp32 summation order by ~1e-6)."""
    import lm_eval

    task_dir = _task_dir(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with start_serve(tiny_model_dir, tmp_path, "serve.max_prompt_tokens=256") as (url, _):
        out = tmp_path / "served"
        cmd = [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "local-completions",
            "--model_args",
            f"model=kubellm,base_url={url}/openai/v1/completions,tokenizer={tiny_model_dir},"
            "tokenizer_backend=huggingface,max_retries=1",
            "--tasks",
            "kubellm_mc",
            "--include_path",
            str(task_dir),
            "--batch_size",
            "4",
            "--output_path",
            str(out),
            "--log_samples",
        ]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results_file = next(out.rglob("results_*.json"))
    served = json.loads(results_file.read_text())
    served["samples"] = {
        "kubellm_mc": [
            json.loads(line) for line in next(out.rglob("samples_kubellm_mc_*.jsonl")).read_text().splitlines()
        ]
    }

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    local = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model_dir},dtype=float32",
        tasks=["kubellm_mc"],
        batch_size=4,
        device="cpu",
        log_samples=True,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir)),
    )
    served_acc, served_ll = _scores(served)
    local_acc, local_ll = _scores(local)
    assert served_acc == local_acc
    assert len(served_ll) == len(QUESTIONS)
    for got, want in zip(served_ll, local_ll, strict=True):
        assert all(abs(g - w) < TOL for g, w in zip(got, want, strict=True)), (got, want)
