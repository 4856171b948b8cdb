"""Sharded training (``loop.parallelism: fsdp``) against DDP: the same 2-process gloo run of kubellm's loop.

- step time: steady-state seconds per optimizer step of ``kubellm pretrain`` under ``torchrun
  --nproc_per_node 2`` with FSDP2 over the same with DDP (goal: FSDP ≥ 0.8× DDP's speed, i.e. ≤ 1.25× its
  seconds per step), in fp32 and in bf16 (FSDP then gathers bf16 weights, DDP runs bf16 autocast);
- activation checkpointing under FSDP: seconds per step and the peak resident set of the largest
  process (a rank) with it over without it (recomputing every block costs roughly one more forward;
  what it saves is the blocks' saved activations, which at these sizes are a small part of a process
  that also holds the interpreter, torch and transformers: the planner's figure for the activations is
  in the note);
- ``torch.compile`` of each block's forward under FSDP: steady-state seconds per step compiled over not
  (goal: reported; ``loop.compile_blocks`` stays off by default unless it pays here), and the compile time
  (the first window's excess over the steady state).

Model: the ``small`` preset (~4 M parameters with a 4 k vocabulary) on bench_train's pretraining data
(256-token blocks), micro-batch 8 per process. Steps are read from the loop's own ``history.jsonl``
windows, the first dropped as warm-up (:func:`bench_ray.seconds_per_step`). FSDP and DDP alternate over the
rounds and each keeps its best. On a 2-core machine two ranks already take both cores; the neighbours'
load is in the note. This runs on CPUs only: no GPU has run it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

GOAL = 0.8


def _row(measure: str, kubellm: float, baseline: float | None, goal: str, ok: bool, note: str = "") -> dict:
    return {
        "benchmark": "fsdp",
        "measure": measure,
        "kubellm": round(kubellm, 4),
        "baseline": round(baseline, 4) if baseline is not None else None,
        "ratio": round(kubellm / baseline, 3) if baseline else None,
        "goal": goal,
        "ok": ok,
        "note": note,
    }


def _sets(steps: int, log_every: int, **loop: object) -> list[str]:
    base = {
        "max_steps": steps,
        "log_every": log_every,
        "checkpoint_every": steps,
        "micro_batch_size": 8,
        "eval_batches": 2,
        "precision": "fp32",
        **loop,
    }
    return [f"pretrain.loop.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in base.items()] + [
        "pretrain.model.preset=small",
        "tracking.enabled=false",
    ]


def run(quick: bool) -> list[dict]:
    from bench_ray import seconds_per_step, torchrun
    from bench_train import prepare_data

    from kubellm.train.memory import Plan, estimate, model_shape

    steps, log_every, rounds = (10, 5, 1) if quick else (40, 10, 2)
    variants = {
        "ddp fp32": {},
        "fsdp fp32": {"parallelism": "fsdp"},
        "ddp bf16": {"precision": "bf16"},
        "fsdp bf16": {"parallelism": "fsdp", "precision": "bf16"},
        "fsdp fp32 checkpointing": {"parallelism": "fsdp", "gradient_checkpointing": True},
        "fsdp fp32 compiled": {"parallelism": "fsdp", "compile_blocks": True},
    }
    step: dict[str, float] = {}
    rss: dict[str, int] = {}
    first: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as tmp:
        work = Path(tmp)
        pre, _ = prepare_data(work, quick)
        for r in range(rounds):
            for name, loop in variants.items():
                if r and "compiled" in name:
                    continue  # one compiled round: its minutes of compiling say enough
                out = work / f"{name.replace(' ', '-')}-{r}"
                _, peak = torchrun(pre, out, _sets(steps, log_every, **loop))
                step[name] = min(step.get(name, float("inf")), seconds_per_step(out))
                rss[name] = min(rss.get(name, 1 << 62), peak)
                history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
                tokens = json.loads((out / "kubellm_train.json").read_text())["tokens_seen"] / history[-1]["step"]
                first[name] = tokens / history[0]["tokens_per_s"]  # seconds per step of the first window
        shape = model_shape(work / "fsdp-fp32-0")
    load = f"load avg {os.getloadavg()[0]:.1f}; small preset, 2 gloo processes, 8 × 256 tokens each, {steps} steps"
    plans = {ac: estimate(Plan("pretrain", shape, 256, 8, "fp32", "fsdp", 2, ac, device="cpu")) for ac in (False, True)}
    saved = {ac: plans[ac].parts["activations_or_gradients"] / 2**20 for ac in plans}
    rows = []
    for precision in ("fp32", "bf16"):
        fsdp, ddp = step[f"fsdp {precision}"], step[f"ddp {precision}"]
        rows.append(
            _row(
                f"steps/s {precision}, FSDP vs DDP",
                1 / fsdp,
                1 / ddp,
                f"≥ {GOAL}×",
                ddp / fsdp >= GOAL,
                f"{load}; s/step FSDP {fsdp:.3f}, DDP {ddp:.3f}",
            )
        )
    ac, plain = "fsdp fp32 checkpointing", "fsdp fp32"
    rows.append(_row("activation checkpointing: s/step with / without", step[ac], step[plain], "reported", True, load))
    rows.append(
        _row(
            "activation checkpointing: peak RSS MiB of a rank with / without",
            rss[ac] / 1024,
            rss[plain] / 1024,
            "reported",
            True,
            f"planner: activations {saved[True]:.0f} vs {saved[False]:.0f} MiB; {load}",
        )
    )
    compiled = "fsdp fp32 compiled"
    rows.append(
        _row(
            "torch.compile per block: s/step compiled / eager",
            step[compiled],
            step[plain],
            "reported (on if < 1)",
            True,
            load,
        )
    )
    rows.append(
        _row(
            "torch.compile per block: compile seconds (first window's excess)",
            (first[compiled] - step[compiled]) * log_every,
            None,
            "reported",
            True,
            load,
        )
    )
    return rows
