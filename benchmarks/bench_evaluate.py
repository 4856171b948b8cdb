"""Evaluation and tracking, side by side with the plain way of doing the same thing.

- held-out generation: ``generate_answers`` (greedy, left-padded batches of 8) against one
  ``model.generate`` call per prompt, tokens/s (goal ≥ 3×; a static batch of 8 measured 5.3× on 2 cores), and the
  answers must be identical;
- held-out perplexity: ``heldout_nll`` (padded batches of 8) against a forward pass per row, tokens/s
  (goal ≥ 1.5×), and the two perplexities must agree to 1e-4;
- tracking: ``MlflowTracker.log_metrics`` (explicit run id through ``MlflowClient``) against
  ``mlflow.log_metrics`` on the fluent active run, ms per logged step into the same sqlite store
  (goal ≤ 1.3×: the explicit-id design must not cost more than mlflow's own convenience API).

Model: the ``small`` preset (~4 M parameters, random weights: it never stops early, so every prompt
generates the full budget); data: ``builtin://stdlib-instruct`` prepared by ``kubellm.data.prepare``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path


def _row(measure: str, kubellm: float, baseline: float, goal: str, ok: bool, note: str = "") -> dict:
    # The load average goes in the note: on a shared 2-core machine a load of 8 makes any figure noisy.
    load = f"load {os.getloadavg()[0]:.1f}"
    return {
        "benchmark": "evaluate",
        "measure": measure,
        "kubellm": round(kubellm, 4),
        "baseline": round(baseline, 4),
        "ratio": round(kubellm / baseline, 3) if baseline else None,
        "goal": goal,
        "ok": ok,
        "note": f"{note}; {load}" if note else load,
    }


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _race(ours, theirs, repeat: int):
    """Best time of each over ``repeat`` alternating runs: the machine is shared, so the fastest run is
    the least disturbed one, and alternating exposes both sides to the same background load."""
    best = [(float("inf"), None), (float("inf"), None)]
    for _ in range(repeat):
        for k, fn in enumerate((ours, theirs)):
            secs, out = _timed(fn)
            if secs < best[k][0]:
                best[k] = (secs, out)
    return best[0], best[1]


def _setup(work: Path, n_docs: int):
    from kubellm.config.data import DataConfig
    from kubellm.config.train import ModelConfig
    from kubellm.data.prepare import prepare
    from kubellm.models.causal_lm import build_model

    prep = prepare(
        DataConfig.model_validate(
            {
                "kind": "instruct",
                "sources": [{"uri": "builtin://stdlib-instruct"}],
                "max_docs": n_docs,
                "block_size": 256,
                "tokenizer": {"vocab_size": 2048},
                "split": {"validation_fraction": 0.2},
                "pack_instructions": False,
            }
        ),
        work / "prepared",
    )
    m = prep.manifest
    model = build_model(
        ModelConfig(preset="small"),
        vocab_size=m.vocab_size,
        block_size=512,
        bos_token_id=m.bos_token_id,
        eos_token_id=m.eos_token_id,
        pad_token_id=m.pad_token_id,
    )
    return prep, model.eval()


def _generation(prep, model, n_prompts: int, new_tokens: int, repeat: int) -> dict:
    import torch

    from kubellm.data.format import open_prepared
    from kubellm.evaluate.run import generate_answers

    ds = open_prepared(prep.path)
    tok, m = ds.load_tokenizer(), ds.manifest
    convs = [ex["messages"] for ex in ds.heldout()[:n_prompts]]
    stop = list(m.stop_token_ids) or [m.eos_token_id]
    kw = dict(max_new_tokens=new_tokens, stop_ids=stop, pad_id=m.pad_token_id, max_positions=512, device="cpu")
    generate_answers(model, tok, convs[:1], batch_size=1, **kw)  # warm-up: first-call kernel setup is not timed

    def plain() -> tuple[list[str], int]:
        out, n = [], 0
        with torch.inference_mode():
            for messages in convs:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][-(512 - new_tokens) :]])
                new = model.generate(
                    input_ids=ids,
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=stop,
                    pad_token_id=m.pad_token_id,
                )[0, ids.shape[1] :].tolist()
                end = next((j for j, t in enumerate(new) if t in stop), len(new))
                n += end
                out.append(tok.decode(new[:end], skip_special_tokens=True).strip())
        return out, n

    (secs, (answers, generated)), (base_secs, (base_answers, base_generated)) = _race(
        lambda: generate_answers(model, tok, convs, batch_size=8, **kw), plain, repeat
    )
    ours, theirs = generated / secs, base_generated / base_secs
    same = answers == base_answers
    return _row(
        f"greedy generation tokens/s, {len(convs)} prompts × {new_tokens} (batch 8 vs 1)",
        ours,
        theirs,
        "≥ 3×, same answers",
        same and ours >= 3 * theirs,
        "answers identical" if same else "ANSWERS DIFFER",
    )


def _perplexity(prep, model, repeat: int) -> dict:
    import torch

    from kubellm.data.format import open_prepared
    from kubellm.evaluate.run import heldout_nll

    ds = open_prepared(prep.path)
    split = ds.load_split("validation")
    heldout_nll(
        model, split.select(range(1)), pad_id=ds.manifest.pad_token_id, batch_size=1, max_batches=None, device="cpu"
    )  # warm-up

    def plain() -> tuple[float, int]:
        total, count = 0.0, 0
        with torch.inference_mode():
            for row in split:
                ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
                logits = model(input_ids=ids).logits[:, :-1].float()
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.size(-1)),
                        labels[:, 1:].reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                )
                count += int((labels[:, 1:] != -100).sum())
        return total, count

    (secs, (nll, tokens)), (base_secs, (base_nll, base_tokens)) = _race(
        lambda: heldout_nll(
            model, split, pad_id=ds.manifest.pad_token_id, batch_size=8, max_batches=None, device="cpu"
        ),
        plain,
        repeat,
    )
    agree = tokens == base_tokens and math.isclose(nll / tokens, base_nll / base_tokens, rel_tol=1e-4)
    ours, theirs = tokens / secs, base_tokens / base_secs
    return _row(
        f"held-out perplexity tokens/s, {len(split)} rows (batch 8 vs per row)",
        ours,
        theirs,
        "≥ 1.5×, same perplexity",
        agree and ours >= 1.5 * theirs,
        f"perplexity {math.exp(nll / tokens):.2f} both" if agree else "PERPLEXITIES DIFFER",
    )


def _tracking(work: Path, steps: int) -> dict:
    import mlflow

    from kubellm.config.tracking import TrackingConfig
    from kubellm.tracking import resolve_tracking_uri, stage_run

    cfg = TrackingConfig(experiment="bench")
    with stage_run(cfg, work, parent_run_id=None, stage="bench") as tracker:
        ours, _ = _timed(
            lambda: [tracker.log_metrics({"loss": 1.0 / s, "lr": 1e-3}, step=s) for s in range(1, steps + 1)]
        )
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg, work))
    mlflow.set_experiment("bench")
    with mlflow.start_run():
        theirs, _ = _timed(
            lambda: [mlflow.log_metrics({"loss": 1.0 / s, "lr": 1e-3}, step=s) for s in range(1, steps + 1)]
        )
    mlflow.set_tracking_uri(None)
    ms, base_ms = 1000 * ours / steps, 1000 * theirs / steps
    return _row(
        f"ms per logged step (2 metrics, {steps} steps, sqlite)",
        ms,
        base_ms,
        "≤ 1.3×",
        ms <= 1.3 * base_ms,
        "lower is better",
    )


def run(quick: bool) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        work = Path(tmp)
        prep, model = _setup(work, 150 if quick else 600)
        repeat = 1 if quick else 3
        return [
            _generation(prep, model, 8 if quick else 16, 16 if quick else 32, repeat),
            _perplexity(prep, model, repeat),
            _tracking(work / "track", 50 if quick else 200),
        ]
