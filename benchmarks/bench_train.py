"""Training throughput, side by side with plain PyTorch loops on the same model, data, batch and optimizer.

- pretraining tokens/s of kubellm's loop in fp32 against a plain fp32 loop (goal ≥ 0.95×), and with bf16
  (the default where native) against the same plain fp32 loop (goal ≥ 2×) and against the plain loop
  under ``torch.autocast(bfloat16)`` (goal ≥ 1.0×), with the bf16 loss curve within 2 % of fp32's at
  every logged step (same seed, same data order);
- LoRA fine-tuning likewise: kubellm LoRA in fp32 and bf16 against a plain peft loop in fp32 (goals
  ≥ 0.95× and ≥ 1.8×) and in bf16 autocast (≥ 1.0×);
- model FLOPs utilisation (6·N per token plus the attention term 12·L·T·d; LoRA: 4·N + 6·N_lora plus
  attention) against the fp32 and bf16 matmul peaks measured in the same run with a plain torch.matmul loop,
  and the bf16 MFU of the ``125m`` preset (goal ≥ 35 %; baseline: the plain bf16-autocast loop).

Models: the ``small`` preset (~4 M parameters with a 4 k vocabulary), 8 × 256-token sequences per step,
and the ``125m`` preset (~91 M with that vocabulary; 4 × 256 tokens, a few steps); AdamW with warmup and
cosine decay, gradient clipping at 1.0. Data: the built-in stdlib corpus and its instruction pairs.
Variants run alternately; each keeps its best round. The first logged window of every run is warm-up
and is dropped.

Clocks: these 2-core machines are shared by several jobs, and wall-clock rates there measure the
neighbours too (ratios of the same code swung 0.9–1.6× between rounds). So every figure is measured
twice: on one intra-op thread timed in CPU seconds of this process (``time.process_time``: robust to
the neighbours; the rows say "/CPU-s"), and on all cores timed by the wall clock (the rows say "/s";
the load average is in the note). bf16 gains more from the second core than fp32 does (its matmul peak
is ~2.3× fp32's on one thread and ~4× on two), so the bf16 ratios differ between the two.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from kubellm.tracking.base import NullTracker

#: The clock every measurement reads: ``time.process_time`` (one thread) or ``time.perf_counter``.
clock = time.process_time

BLOCK = 256
VOCAB = 4096
MBS = 8
SEED = 1234
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: The larger bench size: fewer sequences per step and a few steps keep it to seconds per run.
BIG, BIG_MBS, BIG_STEPS = "125m", 4, 4
LOSS_TOLERANCE = 0.02


def _row(measure: str, kubellm: float, baseline: float | None, goal: str, ok: bool, note: str = "") -> dict:
    return {
        "benchmark": "train",
        "measure": measure,
        "kubellm": round(kubellm, 4),
        "baseline": round(baseline, 4) if baseline is not None else None,
        "ratio": round(kubellm / baseline, 3) if baseline else None,
        "goal": goal,
        "ok": ok,
        "note": note,
    }


# -- peaks -------------------------------------------------------------------------------------------
def matmul_peak(dtype: Any, seconds: float) -> float:
    """GFLOP per second of ``clock`` of a plain square matmul loop (n = 1024), the best of a few chunks."""
    import torch

    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, clock() + seconds
    while clock() < deadline:
        t, reps = clock(), 8
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (clock() - t) / 1e9)
    return best


# -- data --------------------------------------------------------------------------------------------
def prepare_data(work: Path, quick: bool) -> tuple[Path, Path]:
    from kubellm.config.data import DataConfig
    from kubellm.data.prepare import prepare

    common = {"block_size": BLOCK, "cleaning": {"max_chars": 10**7}, "split": {"validation_fraction": 0.02}}
    pre = prepare(
        DataConfig.model_validate(
            {
                **common,
                "kind": "pretrain",
                "sources": [{"uri": "builtin://stdlib"}],
                "max_docs": 40 if quick else 120,
                "tokenizer": {"vocab_size": VOCAB},
            }
        ),
        work / "pretrain",
    )
    ins = prepare(
        DataConfig.model_validate(
            {
                **common,
                "kind": "instruct",
                "sources": [{"uri": "builtin://stdlib-instruct"}],
                "max_docs": 400 if quick else 1500,
            }
        ),
        work / "instruct",
        tokenizer_dir=pre.path / "tokenizer",
    )
    return pre.path, ins.path


# -- kubellm -----------------------------------------------------------------------------------------
def _loop(steps: int, log_every: int, precision: str, mbs: int = MBS) -> dict:
    return {
        "max_steps": steps,
        "micro_batch_size": mbs,
        "log_every": log_every,
        "checkpoint_every": 10**6,
        "eval_batches": 1,
        "precision": precision,
        "seed": SEED,
    }


class Marks(NullTracker):
    """Reads ``clock`` whenever the loop logs, so its windows are timed by the benchmark's clock."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[int, float]] = []

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if "lr" in metrics:  # a window record (not the final summary)
            self.marks.append((int(step or 0), clock()))
        super().log_metrics(metrics, step)

    def window(self) -> tuple[int, int, float]:
        """(first logged step, last-but-one logged step, seconds between them): the first window is
        warm-up, and the last one also holds the final validation pass."""
        (s0, c0), (s1, c1) = self.marks[0], self.marks[-2]
        return s0, s1, c1 - c0


def kubellm_pretrain(
    data: Path, out: Path, precision: str, steps: int, log_every: int, preset: str = "small", mbs: int = MBS
) -> tuple[float, list]:
    import json

    from kubellm.config.train import PretrainConfig
    from kubellm.train.pretrain import pretrain

    cfg = PretrainConfig.model_validate({"model": {"preset": preset}, "loop": _loop(steps, log_every, precision, mbs)})
    clock = Marks()
    pretrain(cfg, data, out, clock)
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    s0, s1, seconds = clock.window()
    return (s1 - s0) * mbs * BLOCK / seconds, [h["loss"] for h in history]


def kubellm_lora(base: Path, data: Path, out: Path, precision: str, steps: int, log_every: int) -> float:

    from kubellm.config.train import FinetuneConfig
    from kubellm.train.finetune import finetune

    cfg = FinetuneConfig.model_validate(
        {"lora": {"target_modules": LORA_TARGETS}, "loop": _loop(steps, log_every, precision)}
    )
    clock = Marks()
    finetune(cfg, base, data, out, clock)
    s0, s1, seconds = clock.window()
    return stream_tokens(data, s0, s1) / seconds


def stream_tokens(data: Path, first: int, last: int) -> int:
    """Non-pad tokens kubellm's loop reads in steps first+1 … last (its data order is deterministic)."""
    from datasets import load_from_disk

    from kubellm.train.batches import StreamSampler

    lengths = [len(x) for x in load_from_disk(str(data / "dataset"))["train"]["input_ids"]]
    sampler = StreamSampler(len(lengths), MBS, seed=SEED)
    return sum(lengths[i] for pos in range(first * MBS, last * MBS, MBS) for i in sampler.indices(pos))


# -- plain baselines ---------------------------------------------------------------------------------
def _plain_optimizer(params: list, steps: int) -> tuple[Any, Any]:
    import torch

    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / 10 if s < 10 else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 10) / max(1, steps - 10)))
    )
    return opt, sched


def _plain_train(model: Any, batches: list[dict], steps: int, warmup: int, precision: str = "fp32") -> float:
    """The loop everybody writes first: forward with labels (under ``torch.autocast(bfloat16)`` for
    bf16), backward, clip, step. Returns tokens per second of ``clock`` after ``warmup`` steps."""
    import contextlib

    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _plain_optimizer(params, steps)
    model.train()
    tokens, t0 = 0, 0.0
    for step in range(steps):
        if step == warmup:
            tokens, t0 = 0, clock()
        batch = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return tokens / (clock() - t0)


def _rows(data: Path, n: int) -> list[dict]:
    import numpy as np
    from datasets import load_from_disk

    train = load_from_disk(str(data / "dataset"))["train"]
    order = np.random.default_rng([SEED, 0]).permutation(len(train))[:n].tolist()
    return [train[i] for i in order]


def plain_pretrain(
    data: Path, steps: int, warmup: int, precision: str = "fp32", preset: str = "small", mbs: int = MBS
) -> float:
    import json

    import torch

    from kubellm.config.train import ModelConfig
    from kubellm.models.causal_lm import build_model

    m = json.loads((data / "manifest.json").read_text())
    model = build_model(
        ModelConfig(preset=preset),
        vocab_size=m["vocab_size"],
        block_size=BLOCK,
        bos_token_id=m["bos_token_id"],
        eos_token_id=m["eos_token_id"],
        pad_token_id=m["pad_token_id"],
        seed=SEED,
    )
    rows = _rows(data, steps * mbs)
    batches = []
    for i in range(steps):
        ids = torch.tensor([r["input_ids"] for r in rows[i * mbs : (i + 1) * mbs]], dtype=torch.long)
        batches.append({"input_ids": ids, "labels": ids})
    return _plain_train(model, batches, steps, warmup, precision)


def plain_lora(base: Path, data: Path, steps: int, warmup: int, precision: str = "fp32") -> float:
    import json

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    pad = json.loads((data / "manifest.json").read_text())["pad_token_id"]
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(SEED)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"),
    )
    rows = _rows(data, steps * MBS)
    batches = []
    for i in range(steps):
        chunk = rows[i * MBS : (i + 1) * MBS]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[j, :n], labels[j, :n], mask[j, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return _plain_train(model, batches, steps, warmup, precision)


# -- FLOPs -------------------------------------------------------------------------------------------
def flops_per_token(model_dir: Path, seq: float, lora_params: int | None = None) -> float:
    """6·N + 12·L·T·d, N the matmul parameters (a tied embedding counts once, as the output head; an
    untied input embedding is a lookup and does not count); LoRA skips the frozen weights' gradients:
    4·N + 6·N_lora + 12·L·T·d."""
    import json

    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        untied = any(k.endswith("lm_head.weight") for k in names)
        n = sum(
            math.prod(f.get_slice(k).get_shape()) for k in names if not (untied and k.endswith("embed_tokens.weight"))
        )
    attention = 12 * cfg["num_hidden_layers"] * seq * cfg["hidden_size"]
    if lora_params is None:
        return 6 * n + attention
    return 4 * n + 6 * lora_params + attention


def _mean_len(data: Path) -> float:
    from datasets import load_from_disk

    lengths = [len(x) for x in load_from_disk(str(data / "dataset"))["train"]["input_ids"]]
    return sum(lengths) / len(lengths)


def run(quick: bool) -> list[dict]:
    import os

    import torch

    global clock
    threads = torch.get_num_threads()
    steps, log_every, rounds = (8, 2, 1) if quick else (15, 3, 2)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        pre, ins = prepare_data(work, quick)
        try:
            setups = ((1, time.process_time, "/CPU-s"), (os.cpu_count() or 1, time.perf_counter, "/s"))
            for n_threads, timer, unit in setups:
                clock = timer
                torch.set_num_threads(n_threads)
                load = f"{n_threads} thread(s); load avg {os.getloadavg()[0]:.1f}" if unit == "/s" else "1 thread"
                rows += _measure(
                    work / f"runs{n_threads}{unit[1:]}", pre, ins, quick, steps, log_every, rounds, unit, load
                )
        finally:
            torch.set_num_threads(threads)
            clock = time.process_time
    return rows


def _measure(
    work: Path, pre: Path, ins: Path, quick: bool, steps: int, log_every: int, rounds: int, unit: str, where: str
) -> list[dict]:
    import torch

    best: dict[str, float] = {}
    curves: dict[str, list] = {}

    def keep(name: str, value: float) -> None:
        best[name] = max(best.get(name, 0.0), value)

    peak = {
        "fp32": matmul_peak(torch.float32, 0.5 if quick else 2.0),
        "bf16": matmul_peak(torch.bfloat16, 0.5 if quick else 2.0),
    }
    base = work / "base"  # the first fp32 pretraining run is the LoRA base
    big = work / f"big-{BIG}"  # its config and weights give the 125m FLOPs
    for r in range(rounds):
        for precision in ("fp32", "bf16"):
            out = base if (r, precision) == (0, "fp32") else work / f"pre-{precision}-{r}"
            rate, curves[precision] = kubellm_pretrain(pre, out, precision, steps, log_every)
            keep(f"pretrain {precision}", rate)
            # the plain loops stop where kubellm's measured window ends: the same rows, timed alike
            keep(f"pretrain plain {precision}", plain_pretrain(pre, steps - log_every, log_every, precision))
        for precision in ("fp32", "bf16"):
            keep(
                f"LoRA {precision}",
                kubellm_lora(base, ins, work / f"lora-{precision}-{r}", precision, steps, log_every),
            )
            keep(f"LoRA plain {precision}", plain_lora(base, ins, steps - log_every, log_every, precision))
        if r == 0 or not quick:  # the 125m preset: a few steps, kubellm bf16 against the plain bf16 loop
            out = big if r == 0 else work / f"big-{BIG}-{r}"
            keep(f"{BIG} bf16", kubellm_pretrain(pre, out, "bf16", BIG_STEPS, 1, BIG, BIG_MBS)[0])
            keep(f"{BIG} plain bf16", plain_pretrain(pre, BIG_STEPS - 1, 1, "bf16", BIG, BIG_MBS))
    return _report(best, curves, peak, base, big, ins, unit, where)


def _report(
    best: dict[str, float],
    curves: dict[str, list],
    peak: dict[str, float],
    base: Path,
    big: Path,
    ins: Path,
    unit: str,
    where: str,
) -> list[dict]:
    from kubellm.config.train import LoraConfig
    from kubellm.models.causal_lm import load_causal_lm
    from kubellm.models.precision import cpu_has_native_bf16
    from kubellm.train.lora import apply_lora

    lora = apply_lora(load_causal_lm(base, device="cpu").model, LoraConfig(target_modules=LORA_TARGETS), seed=0)
    lora_n = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    flops = {
        "pretrain": flops_per_token(base, BLOCK),
        "LoRA": flops_per_token(base, _mean_len(ins), lora_n),
        BIG: flops_per_token(big, BLOCK),
    }

    bf16_note = "" if cpu_has_native_bf16() else "; no native bf16 on this CPU: bf16 is emulated"
    deviation = max(abs(a - b) / b for a, b in zip(curves["bf16"], curves["fp32"], strict=True))
    rows = []
    goals = {
        "pretrain": (("fp32", "fp32", 0.95), ("bf16", "fp32", 2.0), ("bf16", "bf16", 1.0)),
        "LoRA": (("fp32", "fp32", 0.95), ("bf16", "fp32", 1.8), ("bf16", "bf16", 1.0)),
    }
    for stage, plain in (("pretrain", "plain"), ("LoRA", "plain peft")):
        for precision, ref_precision, goal in goals[stage]:
            got, ref = best[f"{stage} {precision}"], best[f"{stage} plain {ref_precision}"]
            baseline = f"{plain} {ref_precision}" + (" autocast" if ref_precision == "bf16" else "")
            note = where + (", non-pad tokens" if stage == "LoRA" else "") + (bf16_note if precision == "bf16" else "")
            rows.append(
                _row(f"{stage} tokens{unit} {precision} vs {baseline}", got, ref, f"≥ {goal}", got >= goal * ref, note)
            )
        if stage == "pretrain":
            rows.append(
                _row(
                    f"pretrain loss bf16 vs fp32 (max rel. dev., {unit[1:]})",
                    deviation,
                    LOSS_TOLERANCE,
                    "≤ 1 (2 %)",
                    deviation <= LOSS_TOLERANCE,
                    f"{len(curves['fp32'])} logged steps, same seed and data",
                )
            )
    rows.append(
        _row(
            f"matmul peak GFLOP{unit} bf16 vs fp32",
            peak["bf16"],
            peak["fp32"],
            "",
            True,
            f"torch.matmul 1024², same run; {where}",
        )
    )

    def mfu(rate: float, precision: str, stage: str) -> float:
        return rate * flops[stage] / 1e9 / peak[precision]

    for stage in ("pretrain", "LoRA"):
        for precision in ("fp32", "bf16"):
            rows.append(
                _row(
                    f"MFU {stage} {precision} (of the {precision} peak, {unit[1:]})",
                    mfu(best[f"{stage} {precision}"], precision, stage),
                    mfu(best[f"{stage} plain {precision}"], precision, stage),
                    "",
                    True,
                    f"{flops[stage] / 1e6:.1f} MFLOP/token; baseline: the plain {precision} loop",
                )
            )
    got, ref = mfu(best[f"{BIG} bf16"], "bf16", BIG), mfu(best[f"{BIG} plain bf16"], "bf16", BIG)
    rows.append(
        _row(
            f"MFU pretrain {BIG} bf16 (of the bf16 peak, {unit[1:]})",
            got,
            ref,
            "≥ 0.35",
            got >= 0.35,
            f"{flops[BIG] / 1e6:.0f} MFLOP/token, {BIG_MBS} × {BLOCK} tokens/step; baseline: the plain "
            f"bf16-autocast loop; {where}",
        )
    )
    return rows
