"""One command for the day a GPU is lent: bf16 training throughput and MFU, a QLoRA step, the predictor.

    python benchmarks/gpu.py                      # CUDA GPUs, under 10 minutes; prints a table
    python benchmarks/gpu.py --json gpu.json      # also write the rows
    python benchmarks/gpu.py --device cpu --tiny  # the same code on tiny shapes: a dry run, no figures

What it measures, each with the pieces kubellm's training loop and predictor use:

- **pretraining** of the ``125m`` and ``1b`` presets (32 k vocabulary, 2048-token sequences): tokens/s of
  full optimizer steps (bf16 autocast forward, the loop's loss, backward, clipping, fused AdamW) after
  warm-up steps, and MFU = tokens/s × (6·N + 12·L·T·d) / peak. The peak is the GPU's nominal dense bf16
  figure (``--peak-tflops``; 989 TFLOP/s for an H100/H200 SXM, from the spec sheet) — the goal is ≥ 40 %
  of it on an H200 — and MFU against the bf16 matmul peak measured here (8192² ``torch.matmul``) is
  printed beside it;
- **QLoRA**: the ``1b`` preset saved, loaded in 4-bit NF4 through ``kubellm.models.causal_lm.load_causal_lm``
  with ``finetune.quantization: 4bit``'s settings, LoRA on every projection, tokens/s of training steps;
  skipped with the reason when bitsandbytes or CUDA is missing;
- **the predictor**: ``kubellm.serve.engine.GenerationEngine`` serving the ``125m`` model in bf16 to 64
  concurrent greedy requests of 128 new tokens: generated tokens/s and the median request latency;
- **sharded pretraining** (``loop.parallelism: fsdp``): ``torchrun`` over every visible GPU, FSDP2 on each
  block and the root with bf16 gathered weights and fp32 reduction (:mod:`kubellm.train.sharding`), the
  largest preset the memory planner fits (``8b`` on 8 × 80 GB, ``1b`` on one GPU), with and without
  ``torch.compile`` per block: tokens/s per GPU and MFU of the nominal peak, printed beside torchtitan's
  published Llama-3.1-8B figures on 8 × H100 (FSDP 5,762 tokens/s per GPU, + compile 6,667; MFU 33–39 %).
  The model is built on the meta device and materialised shard by shard, so no rank ever holds all of it.
  This part has never run on a GPU: only its ``--tiny`` dry run on 2 CPU processes (gloo, no compile) has.

It is not part of ``make bench`` (CPU ratios against plain loops) and CI skips it: the ``gpu``-marked test
runs it only where ``nvidia-smi`` is present; a quick test runs ``--device cpu --tiny``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: torchtitan's Llama-3.1-8B pretraining on 8 × H100 (benchmarks/llama3_h100_202412_torchtitan.md):
#: tokens/s per GPU, and the MFU range it reports without Float8.
TORCHTITAN_8B = {"fsdp": 5762.0, "fsdp+compile": 6667.0}
TORCHTITAN_MFU = "33–39 %"
#: Nominal dense bf16 peaks (TFLOP/s, no sparsity) by a substring of ``torch.cuda.get_device_name``.
NOMINAL_PEAKS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0}


@dataclasses.dataclass(frozen=True)
class Shape:
    """Sizes of one run: full on a GPU, tiny for a dry run of the code on a CPU."""

    vocab: int
    seq: int
    batch: dict[str, int]
    """Sequences per step for each preset."""
    warmup: int
    steps: int
    matmul: int
    requests: int
    new_tokens: int
    presets: dict[str, dict[str, int]]
    """Dimension overrides per preset (tiny shapes keep each preset's layout at toy width)."""


FULL = Shape(
    vocab=32768,
    seq=2048,
    batch={"125m": 16, "1b": 8},
    warmup=3,
    steps=10,
    matmul=8192,
    requests=64,
    new_tokens=128,
    presets={"125m": {}, "1b": {}},
)
TINY = Shape(
    vocab=600,
    seq=64,
    batch={"125m": 2, "1b": 2},
    warmup=1,
    steps=2,
    matmul=256,
    requests=4,
    new_tokens=4,
    presets={
        "125m": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 128},
        "1b": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128},
    },
)


def _row(measure: str, value: float | None, unit: str, note: str = "") -> dict[str, Any]:
    return {
        "benchmark": "gpu",
        "measure": measure,
        "value": None if value is None else round(value, 4),
        "unit": unit,
        "note": note,
    }


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / reps


def matmul_peak(device: str, n: int) -> float:
    """Measured bf16 matmul TFLOP/s (square ``n``)."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / _timed(device, lambda: a @ b, 3, 10) / 1e12


def nominal_peak(device: str, override: float | None) -> tuple[float | None, str]:
    import torch

    if override is not None:
        return override, "--peak-tflops"
    if not device.startswith("cuda"):
        return None, "no nominal peak for a CPU"
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in NOMINAL_PEAKS.items() if k in name), None)
    return peak, f"{name} spec sheet" if peak else f"{name}: unknown, pass --peak-tflops"


def build(preset: str, shape: Shape, device: str, dtype: Any = None) -> Any:
    from kubellm.config.train import ModelConfig
    from kubellm.models.causal_lm import build_model

    model = build_model(
        ModelConfig(preset=preset, **shape.presets[preset]),
        vocab_size=shape.vocab,
        block_size=shape.seq,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    model.config.use_cache = False
    return model.to(device=device, dtype=dtype)


def matmul_params(model: Any) -> int:
    """Parameters that take part in matmuls: every Linear weight once (a tied head is the embedding)."""
    import torch

    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sum(weights.values())


def train_rate(model: Any, shape: Shape, batch: int, device: str) -> float:
    """Tokens/s of bf16 training steps as kubellm's loop takes them (autocast, its loss, clip, fused AdamW)."""
    import torch

    from kubellm.config.train import OptimConfig
    from kubellm.models.losses import token_nll_sum
    from kubellm.models.precision import autocast, cpu_bf16_fast_path
    from kubellm.train.loop import build_optimizer, forward_logits
    from kubellm.train.sharding import clip_grad_norm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, OptimConfig())
    ids = torch.randint(2, shape.vocab, (batch, shape.seq), device=device)
    model.train()

    def step() -> None:
        with autocast("bf16", device):
            logits = forward_logits(model, {"input_ids": ids})
        (token_nll_sum(logits, ids) / ids.numel()).backward()
        clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with cpu_bf16_fast_path(model, "bf16", device):
        return batch * shape.seq / _timed(device, step, shape.warmup, shape.steps)


def _fits(preset: str, shape: Shape, gpus: int, batch: int, gib: float) -> bool:
    """Whether the memory planner fits an fsdp bf16 pretraining step with checkpointing on these GPUs."""
    from kubellm.config.train import ModelConfig
    from kubellm.models.causal_lm import _TIED, model_dimensions
    from kubellm.train.memory import GIB, ModelShape, Plan, estimate

    d = model_dimensions(ModelConfig(preset=preset, **shape.presets.get(preset, {})))
    dims = ModelShape(
        shape.vocab,
        d["hidden_size"],
        d["num_layers"],
        d["num_heads"],
        d["num_kv_heads"],
        d["intermediate_size"],
        preset in _TIED,
    )
    return estimate(Plan("pretrain", dims, shape.seq, batch, "bf16", "fsdp", gpus, True)).total <= gib * GIB


def sharded(shape: Shape, device: str, tiny: bool, peaks: dict[str, float | None]) -> list[dict[str, Any]]:
    """FSDP (+ compile) pretraining rows from a ``torchrun`` over the visible GPUs (2 CPU processes on a
    dry run), beside torchtitan's published 8 B figures."""
    import torch

    cuda = device.startswith("cuda")
    gpus = torch.cuda.device_count() if cuda else 2
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else float("inf")
    preset, batch = next(
        ((p, b) for p in ("8b", "1b", "125m") for b in (4, 2, 1) if _fits(p, shape, gpus, b, gib)), ("125m", 1)
    )
    if tiny:
        preset = "1b"  # at toy width
    rows = []
    for variant in ("fsdp", "fsdp+compile"):
        rows.append(
            _row(
                f"torchtitan Llama-3.1-8B {variant} tokens/s per GPU (published, 8 × H100)",
                TORCHTITAN_8B[variant],
                "tokens/s",
                f"not measured here; MFU {TORCHTITAN_MFU}, 8192-token sequences",
            )
        )
        if variant == "fsdp+compile" and not cuda:
            rows.append(
                _row(
                    f"pretrain {preset} {variant} bf16 tokens/s per GPU: SKIPPED",
                    None,
                    "tokens/s",
                    "inductor on a CPU compiles for minutes; make bench measures compile on CPU",
                )
            )
            continue
        with tempfile.TemporaryDirectory(prefix="kubellm-fsdp-") as tmp:
            spec = Path(tmp) / "spec.json"
            spec.write_text(
                json.dumps(
                    {
                        "preset": preset,
                        "batch": batch,
                        "compile": variant.endswith("compile"),
                        "device": device,
                        "shape": dataclasses.asdict(shape),
                    }
                )
            )
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            proc = subprocess.run(
                [
                    str(Path(sys.executable).parent / "torchrun"),
                    "--standalone",
                    "--nproc_per_node",
                    str(gpus),
                    __file__,
                    "--fsdp-worker",
                    str(spec),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"fsdp worker failed: {proc.stderr[-2000:]}")
            got = json.loads((Path(tmp) / "result.json").read_text())
        note = (
            f"{gpus} {'GPUs' if cuda else 'CPU processes'}, {batch} × {shape.seq} tokens per GPU, "
            f"gradient checkpointing, {got['flops'] / 1e9:.1f} GFLOP/token"
        )
        rows.append(_row(f"pretrain {preset} {variant} bf16 tokens/s per GPU", got["rate"], "tokens/s", note))
        for name, peak in peaks.items():
            if peak:
                rows.append(
                    _row(
                        f"MFU pretrain {preset} {variant} bf16 (of the {name} peak)",
                        got["rate"] * got["flops"] / 1e12 / peak,
                        "fraction",
                        note,
                    )
                )
    return rows


def fsdp_worker(spec_path: Path) -> None:
    """One rank of :func:`sharded`: build on the meta device, shard, materialise, time training steps."""
    import torch
    import torch.distributed as dist

    from kubellm.train import sharding
    from kubellm.train.dist import init_distributed, shutdown

    spec = json.loads(spec_path.read_text())
    shape = Shape(**spec["shape"])
    if not dist.is_initialized():  # one GPU: a group of one, so FSDP's code path runs all the same
        dist.init_process_group("nccl" if spec["device"].startswith("cuda") else "gloo")
    ctx = init_distributed()
    device = ctx.device if spec["device"].startswith("cuda") else "cpu"
    try:
        model = build(spec["preset"], shape, "meta")
        flops = 6 * matmul_params(model) + 12 * model.config.num_hidden_layers * shape.seq * model.config.hidden_size
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if spec["compile"]:
            sharding.compile_blocks(model)
        sharding.shard(model, bf16_weights=True)
        model.to_empty(device=device)
        with torch.no_grad():  # random weights: the figures do not depend on their values
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
            # the rotary frequencies are buffers computed at init: compute them again for real
            for name, buffer in type(model.model.rotary_emb)(model.config).named_buffers():
                model.model.rotary_emb.get_buffer(name).copy_(buffer)
        rate = train_rate(model, shape, spec["batch"], device)
        if ctx.is_main:
            spec_path.with_name("result.json").write_text(json.dumps({"rate": rate, "flops": flops}))
    finally:
        shutdown(ctx)
        if dist.is_initialized():
            dist.destroy_process_group()


def pretraining(shape: Shape, device: str, peaks: dict[str, float | None]) -> list[dict[str, Any]]:
    import torch

    rows = []
    for preset in ("125m", "1b"):
        model = build(preset, shape, device)
        cfg = model.config
        flops = 6 * matmul_params(model) + 12 * cfg.num_hidden_layers * shape.seq * cfg.hidden_size
        rate = train_rate(model, shape, shape.batch[preset], device)
        note = f"{shape.batch[preset]} × {shape.seq} tokens/step, {flops / 1e9:.2f} GFLOP/token"
        rows.append(_row(f"pretrain {preset} bf16 tokens/s", rate, "tokens/s", note))
        for name, peak in peaks.items():
            if peak:
                rows.append(
                    _row(
                        f"MFU pretrain {preset} bf16 (of the {name} peak)",
                        rate * flops / 1e12 / peak,
                        "fraction",
                        f"peak {peak:.1f} TFLOP/s" + ("; goal ≥ 0.40 on an H200" if name == "nominal" else ""),
                    )
                )
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def _tokenizer(shape: Shape) -> Any:
    from kubellm.config.data import TokenizerConfig
    from kubellm.data.builtin import stdlib_files
    from kubellm.data.tokenizer import train_tokenizer

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[:300]]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=min(shape.vocab, 8192)), where="stdlib")


def qlora(shape: Shape, device: str, work: Path) -> dict[str, Any]:
    """Tokens/s of QLoRA steps on the ``1b`` preset (LoRA without 4-bit where QLoRA cannot run)."""
    import importlib.util

    import torch

    from kubellm.config.train import LoraConfig
    from kubellm.models.causal_lm import load_causal_lm
    from kubellm.train.lora import apply_lora, quantization_config

    missing = (
        "no CUDA device"
        if not device.startswith("cuda")
        else "bitsandbytes is not installed"
        if importlib.util.find_spec("bitsandbytes") is None
        else None
    )
    base = work / "base-1b"
    build("1b", shape, "cpu", torch.bfloat16).save_pretrained(str(base))
    _tokenizer(shape).save_pretrained(str(base))
    if missing is None:
        from peft import prepare_model_for_kbit_training

        loaded = load_causal_lm(base, device=device, for_training=True, quantization_config=quantization_config())
        model = prepare_model_for_kbit_training(loaded.model, use_gradient_checkpointing=False)
    else:
        model = load_causal_lm(base, device=device, dtype=torch.float32, for_training=True).model
    model = apply_lora(model, LoraConfig(), seed=0)
    rate = train_rate(model, shape, shape.batch["1b"], device)
    if missing is None:
        return _row(
            "QLoRA 1b (NF4, bf16 compute) tokens/s",
            rate,
            "tokens/s",
            f"{shape.batch['1b']} × {shape.seq} tokens/step, LoRA r=8 on every projection",
        )
    return _row(
        "QLoRA 1b: SKIPPED (LoRA without 4-bit measured instead)",
        rate,
        "tokens/s",
        f"QLoRA needs CUDA and bitsandbytes: {missing}",
    )


def predictor(shape: Shape, device: str) -> list[dict[str, Any]]:
    """Generated tokens/s of the serving engine with every request in flight at once."""
    import torch

    from kubellm.serve.engine import GenerationEngine, SamplingParams

    tokenizer = _tokenizer(shape)
    # the model's vocabulary is the tokenizer's: every id it generates must decode
    model = build("125m", dataclasses.replace(shape, vocab=len(tokenizer)), device).eval()
    model.config.use_cache = True
    prompts = [
        tokenizer(f"def function_{i}(x):\n    return", add_special_tokens=False)["input_ids"]
        for i in range(shape.requests)
    ]
    params = SamplingParams(max_tokens=shape.new_tokens, min_tokens=shape.new_tokens)

    async def serve() -> tuple[float, list[float], int]:
        engine = GenerationEngine(
            model, tokenizer, device=device, precision="bf16", max_batch_size=16, max_queue=max(64, shape.requests)
        )
        await engine.start()
        try:
            await engine.submit(prompts[0], params).result()  # warm-up
            t0 = time.perf_counter()

            async def one(ids: list[int]) -> tuple[float, int]:
                done = await engine.submit(ids, params).result()
                return time.perf_counter() - t0, done.completion_tokens

            results = await asyncio.gather(*(one(p) for p in prompts))
            return time.perf_counter() - t0, [r[0] for r in results], sum(r[1] for r in results)
        finally:
            await engine.stop()

    with torch.inference_mode():
        seconds, latencies, generated = asyncio.run(serve())
    note = f"{shape.requests} concurrent greedy requests × {shape.new_tokens} new tokens, 125m bf16"
    return [
        _row("predictor generated tokens/s", generated / seconds, "tokens/s", note),
        _row("predictor median request latency", statistics.median(latencies), "s", note),
    ]


def run(device: str, tiny: bool, peak_override: float | None) -> list[dict[str, Any]]:
    import torch

    shape = TINY if tiny else FULL
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "error: no CUDA device visible (run on a GPU machine, or pass --device cpu --tiny "
            "for a dry run of the code)"
        )
    measured = matmul_peak(device, shape.matmul)
    nominal, source = nominal_peak(device, peak_override)
    rows = [
        _row("bf16 matmul peak, measured", measured, "TFLOP/s", f"torch.matmul {shape.matmul}²"),
        _row("bf16 dense peak, nominal", nominal, "TFLOP/s", source),
    ]
    rows += pretraining(shape, device, {"nominal": nominal, "measured matmul": measured})
    with tempfile.TemporaryDirectory(prefix="kubellm-gpu-") as tmp:
        rows.append(qlora(shape, device, Path(tmp)))
    rows += predictor(shape, device)
    rows += sharded(shape, device, tiny, {"nominal": nominal, "measured matmul": measured})
    if tiny:
        for row in rows:
            row["note"] = f"dry run (--tiny on {device}): figures mean nothing; " + row["note"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes: checks the code path, measures nothing")
    ap.add_argument("--peak-tflops", type=float, help="nominal dense bf16 peak of this GPU (default: by name)")
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    ap.add_argument("--fsdp-worker", type=Path, help=argparse.SUPPRESS)  # one torchrun rank of the FSDP rows
    args = ap.parse_args(argv)
    if args.fsdp_worker:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
        fsdp_worker(args.fsdp_worker)
        return 0
    if args.device == "cpu" and not args.tiny:
        ap.error("--device cpu only runs the --tiny dry run (the full shapes need a GPU)")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from kubellm.log import print_table, setup

    setup()
    t0 = time.perf_counter()
    rows = run(args.device, args.tiny, args.peak_tflops)
    print_table(f"kubellm on {args.device} ({time.perf_counter() - t0:.0f} s)", rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
