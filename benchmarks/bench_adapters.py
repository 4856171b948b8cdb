"""Many LoRA adapters on one base: throughput of a mixed-adapter load and memory against merged predictors.

Model: ``bench_serve``'s ``small`` preset (random weights) and three LoRA adapters made on it (rank 8 on
the attention projections, random non-zero ``B``, different seeds). Servers on 127.0.0.1, the OpenAI
completions API, every request generating exactly ``N`` tokens greedily:

- **shared**: one ``kubellm serve`` with the base and the three adapters (``--adapter``), unmerged, rows of
  different adapters in one batch;
- **merged**: three ``kubellm serve`` processes, each serving one adapter merged into its base (what a
  release cost before: one predictor, one full copy per fine-tune).

Rows, each against a baseline measured in the same run:

- tokens/s of 8 closed-loop clients spread over the three adapters (client ``i`` asks adapter ``i % 3``)
  vs 8 clients all on one adapter, on the shared server (goal ≥ 0.8×: mixing adapters in a batch costs
  one LoRA product per adapter and layer instead of one);
- the same mixed load on the shared server vs 8 clients on one merged predictor (info: what unmerged LoRA
  costs against merged weights);
- resident memory (RSS) of the shared server vs the three merged predictors together (goal ≤ 0.5×), and
  the weights alone: base + three adapters vs three merged copies (info).

Rounds are interleaved and each side reported by its best round (see ``bench_serve``'s note on this
shared machine); the note carries the load average before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path

import bench_serve as bs

ADAPTERS = ("alpha", "beta", "gamma")


def _make_adapters(base_dir: Path, root: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, name in enumerate(ADAPTERS):
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        torch.manual_seed(100 + i)
        model = get_peft_model(
            base,
            LoraConfig(
                r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
            ),
        )
        model.save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


async def _closed_loop(url: str, models: list[str], prompts: list[str], n: int, per_client: int) -> bs._Load:
    """``CLIENTS`` clients, client ``i`` asking ``models[i % len(models)]``, each sending its next request
    when its answer arrives."""
    import httpx

    load = bs._Load()

    async def ask(http: httpx.AsyncClient, model: str, prompt: str, sink: bs._Load) -> None:
        t = time.perf_counter()
        resp = await http.post(f"{url}/openai/v1/completions", json={**bs._body(prompt, n, False), "model": model})
        resp.raise_for_status()
        sink.latencies.append(time.perf_counter() - t)
        sink.tokens += resp.json()["usage"]["completion_tokens"]

    async def client(i: int, http: httpx.AsyncClient) -> None:
        for k in range(per_client):
            await ask(http, models[i % len(models)], prompts[(i + k) % len(prompts)], load)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=bs.CLIENTS)) as http:
        warm = bs._Load()  # one full batch first, not counted
        await asyncio.gather(*(ask(http, models[i % len(models)], prompts[i], warm) for i in range(bs.CLIENTS)))
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(bs.CLIENTS)))
        load.wall = time.perf_counter() - t0
    return load


def _rss_mb(url: str) -> float:
    import psutil

    return psutil.Process(bs.SERVER_PIDS[url]).memory_info().rss / 2**20


def _weights_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20


def _merged_weights_mb(adapter: Path, out: Path) -> float:
    from kubellm.models.causal_lm import load_causal_lm

    merged = load_causal_lm(adapter, device="cpu", merge_adapter=True)
    merged.model.save_pretrained(out, safe_serialization=True)
    merged.tokenizer.save_pretrained(out)
    return _weights_mb(out)


def run(quick: bool) -> list[dict]:
    return bs.with_threads(_run, quick)


def _run(quick: bool) -> list[dict]:
    n = 16 if quick else 64
    per_client, rounds = (1, 1) if quick else (3, bs.ROUNDS)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        root = Path(tmp)
        base_dir = root / "base"
        bs._build_model(base_dir, vocab=1024 if quick else 4096)
        adapters = _make_adapters(base_dir, root)
        merged_mb = sum(_merged_weights_mb(path, root / f"merged-{name}") for name, path in adapters.items())
        shared_weights_mb = _weights_mb(base_dir) + sum(_weights_mb(p) for p in adapters.values())
        batch = f"serve.max_batch_size={bs.CLIENTS}"
        args = tuple(a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}"))
        prompts = bs._prompts(bs.CLIENTS)
        with contextlib.ExitStack() as stack:
            shared, _ = stack.enter_context(bs._server(base_dir, root, "shared", batch, args=args))
            merged = [
                stack.enter_context(bs._server(root / f"merged-{name}", root, f"merged-{name}", batch))[0]
                for name in ADAPTERS
            ]
            loads: dict[str, list[bs._Load]] = {"mixed": [], "one adapter": [], "merged": []}
            for _ in range(rounds):
                loads["mixed"].append(asyncio.run(_closed_loop(shared, list(ADAPTERS), prompts, n, per_client)))
                loads["one adapter"].append(asyncio.run(_closed_loop(shared, [ADAPTERS[0]], prompts, n, per_client)))
                loads["merged"].append(asyncio.run(_closed_loop(merged[0], ["kubellm"], prompts, n, per_client)))
            shared_rss = _rss_mb(shared)
            merged_rss = sum(_rss_mb(url) for url in merged)
    best = {name: max(load.tokens_per_s for load in runs) for name, runs in loads.items()}
    load_avg = f"load avg {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    note = (
        f"small preset, 3 adapters rank 8, {n} tokens/request, {bs.CLIENTS} clients x {per_client}, "
        f"best of {rounds} rounds, {bs.THREADS} thread, {load_avg}"
    )
    rows = [
        bs._row(
            "generated tokens/s, 8 clients over 3 adapters vs 8 clients on 1 adapter (one shared server)",
            best["mixed"],
            best["one adapter"],
            ">= 0.8x",
            note,
        ),
        bs._row(
            "generated tokens/s, 8 clients over 3 adapters (shared) vs 8 clients on a merged predictor",
            best["mixed"],
            best["merged"],
            "info",
            note,
        ),
        bs._row(
            "resident memory (MB), shared server with 3 adapters vs 3 merged predictors",
            shared_rss,
            merged_rss,
            "<= 0.5x",
            note,
        ),
        bs._row(
            "weights on disk (MB), base + 3 adapters vs 3 merged models", shared_weights_mb, merged_mb, "info", note
        ),
    ]
    return [{**row, "benchmark": "adapters"} for row in rows]
