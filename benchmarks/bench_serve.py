"""Serving: continuous batching against static batching and one request at a time, in the same run.

Model: the ``small`` preset (~4 M parameters, random weights) with a 4 k byte-level BPE vocabulary trained
on the Python standard library's source. Every request generates exactly ``N`` tokens (min = max new
tokens), greedy, under the precision ``serve.precision=auto`` picks (bf16 autocast on these CPUs); the
plain baselines use the same precision, so the ratios measure batching and serving, not precision.

Plain baselines, ``model.generate`` in this process:

- **alone**: one prompt at a time (batch 1): a request's latency with the machine to itself, and the
  tokens/s of serving without batching at best.
- **static batch of 8**: one ``generate`` call on 8 left-padded prompts: the ceiling of batching 8.

Three ``kubellm serve`` processes on 127.0.0.1, the OpenAI completions API: **continuous** (the default:
requests join the running batch at every decode step), **static** (``serve.batching=static``: a request
that arrives while a batch generates waits for all of it) and **one-at-a-time**
(``serve.max_batch_size=1``). Two loads:

- **closed loop**: 8 clients, each sends its next request when its previous answer arrives (not
  streamed); latency p50/p99 and generated tokens/s.
- **open loop**: Poisson arrivals (the same seeded schedule for every server) at ~50 % and ~90 % of the
  capacity the continuous server showed in the closed loop, streamed: latency and time to first token
  p50/p99, generated tokens/s.

Reading the rows: when all 8 requests share every decode step, no scheduler can beat the cost of a
batch-of-8 step, which the plain static batch of 8 shows against one request alone (the ``floor`` row).

Fairness on a shared machine: every side decodes with ``THREADS`` intra-op thread (``OMP_NUM_THREADS``
for the servers, ``torch.set_num_threads`` here, restored afterwards): with 2 OpenMP threads on these 2
cores shared with other processes (load average 11-15) a decode step of this model took 138 ms against
13 ms with one, and varied tenfold from one call to the next. The baselines call ``generate`` on one
worker thread, as the engine does (small-op decoding from the main thread measured 10-60× slower while
other processes were busy). The closed-loop measurements are interleaved over ``ROUNDS`` rounds and each
side is reported by its best round, so a burst of load from other processes does not land on one side
only. The note of every row carries the machine's load average before and after the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CLIENTS = 8
ROUNDS = 3
THREADS = 1
OPEN_LOOP_LOADS = (0.5, 0.9)


def _build_model(out: Path, vocab: int) -> None:
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kubellm.config.train import ModelConfig
    from kubellm.models.causal_lm import build_model

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:80]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<|pad|>", "<|end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    fast.save_pretrained(out)
    model = build_model(
        ModelConfig(preset="small"),
        vocab_size=len(fast),
        block_size=512,
        bos_token_id=None,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)


def _prompts(count: int) -> list[str]:
    # Alike prompts of about the same length: the static batch pads little and every row does the same work.
    return [f"def handler_{i:02d}(request, response):\n    return" for i in range(count)]


class _Baselines:
    """Plain ``model.generate`` on a worker thread: batch 1 one request at a time, or a static batch."""

    def __init__(self, model_dir: Path, n: int) -> None:
        import concurrent.futures

        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kubellm.models.precision import resolve_precision

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.precision = resolve_precision("auto", "cpu")
        self.n = n
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.prompts = _prompts(CLIENTS)
        self.generate(self.prompts[:1])
        self.generate(self.prompts)  # warm-up of both shapes

    def _generate(self, prompts: list[str]) -> None:
        import torch

        from kubellm.models.precision import autocast

        enc = self.tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode(), autocast(self.precision, "cpu"):
            out = self.model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=self.n,
                min_new_tokens=self.n,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id,
            )
        assert out.shape[1] - enc["input_ids"].shape[1] == self.n

    def generate(self, prompts: list[str]) -> float:
        """Seconds one ``generate`` call on ``prompts`` takes."""
        t0 = time.perf_counter()
        self.worker.submit(self._generate, prompts).result()
        return time.perf_counter() - t0

    def sequential(self, requests: int) -> tuple[float, list[float]]:
        """(tokens/s, latencies) of ``requests`` batch-1 calls one after the other."""
        latencies = [self.generate([self.prompts[i % CLIENTS]]) for i in range(requests)]
        return requests * self.n / sum(latencies), latencies

    def static(self) -> float:
        """Tokens/s of one static batch of ``CLIENTS`` prompts."""
        return CLIENTS * self.n / self.generate(self.prompts)


class _Load:
    """What one load run measured on one server (a plain class: ``run.py`` loads this file without
    registering it as a module, which dataclasses need)."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.tokens = 0
        self.latencies: list[float] = []
        self.first_tokens: list[float] = []

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.wall


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"not ready within {timeout_s} s")


#: Process id of each running server by URL (``bench_adapters`` reads their memory).
SERVER_PIDS: dict[str, int] = {}


@contextlib.contextmanager
def _server(
    model_dir: Path, workdir: Path, name: str, *sets: str, args: tuple[str, ...] = ()
) -> Iterator[tuple[str, float]]:
    """``kubellm serve`` with ``sets`` (and more command-line ``args``) on a free port; yields its URL and
    its start-to-ready seconds."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "kubellm.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--set",
        "serve.precision=auto",
        "--set",
        "serve.model_name=kubellm",
        "--set",
        f"workdir={workdir}",
        *args,
    ]
    for item in sets:
        cmd += ["--set", item]
    log = workdir / f"serve-{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS)},
        )
    SERVER_PIDS[url] = proc.pid
    try:
        try:
            _wait_ready(url, proc)
        except RuntimeError as err:
            raise RuntimeError(f"{name}: {err}: {log.read_text()[-2000:]}") from None
        yield url, time.perf_counter() - t0
    finally:
        SERVER_PIDS.pop(url, None)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _plain_startup(model_dir: Path) -> float:
    """A plain process: import transformers, load the model and tokenizer, say ready."""
    code = (
        "import torch, transformers, sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        f"AutoTokenizer.from_pretrained({str(model_dir)!r}); AutoModelForCausalLM.from_pretrained({str(model_dir)!r}); "
        "print('ready', flush=True)"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t0


def _body(prompt: str, n: int, stream: bool) -> dict:
    return {
        "model": "kubellm",
        "prompt": prompt,
        "max_tokens": n,
        "min_tokens": n,
        "temperature": 0,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


async def _request(http, url: str, prompt: str, n: int, stream: bool, load: _Load) -> None:
    """One completion; its latency (and time to first text when streamed) and tokens go into ``load``."""
    import json

    t = time.perf_counter()
    if not stream:
        resp = await http.post(f"{url}/openai/v1/completions", json=_body(prompt, n, False))
        resp.raise_for_status()
        load.latencies.append(time.perf_counter() - t)
        load.tokens += resp.json()["usage"]["completion_tokens"]
        return
    first = None
    async with http.stream("POST", f"{url}/openai/v1/completions", json=_body(prompt, n, True)) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t
            if chunk.get("usage"):
                load.tokens += chunk["usage"]["completion_tokens"]
    load.latencies.append(time.perf_counter() - t)
    load.first_tokens.append(first if first is not None else load.latencies[-1])


async def _warm_up(http, url: str, prompts: list[str]) -> None:
    """One full batch, not counted, so a server's first batch-of-8 shapes are not timed."""
    await asyncio.gather(*(_request(http, url, p, 2, False, _Load()) for p in prompts[:CLIENTS]))


async def _closed_loop(url: str, prompts: list[str], n: int, per_client: int) -> _Load:
    import httpx

    load = _Load()

    async def client(i: int, http: httpx.AsyncClient) -> None:
        for k in range(per_client):
            await _request(http, url, prompts[(i + k) % len(prompts)], n, False, load)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=CLIENTS)) as http:
        await _warm_up(http, url, prompts)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(CLIENTS)))
        load.wall = time.perf_counter() - t0
    return load


async def _open_loop(url: str, prompts: list[str], n: int, rate: float, count: int) -> _Load:
    """``count`` streamed requests arriving as a Poisson process of ``rate`` per second (seeded)."""
    import httpx

    arrivals = random.Random(0)
    at, schedule = 0.0, []
    for _ in range(count):
        at += arrivals.expovariate(rate)
        schedule.append(at)
    load = _Load()

    async def arrive(i: int, http: httpx.AsyncClient, start: float) -> None:
        await asyncio.sleep(max(0.0, start + schedule[i] - time.perf_counter()))
        await _request(http, url, prompts[i % len(prompts)], n, True, load)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=count)) as http:
        await _warm_up(http, url, prompts)
        t0 = time.perf_counter()
        await asyncio.gather(*(arrive(i, http, t0) for i in range(count)))
        load.wall = time.perf_counter() - t0
    return load


def _open_loop_rounds(urls: dict[str, str], prompts: list[str], n: int, rate: float, count: int) -> dict[str, _Load]:
    """Each server's best run (lowest p99 latency) of ``ROUNDS`` interleaved open-loop runs; one-at-a-time
    runs once (it cannot keep up with these rates: its queue, not the machine's load, sets its latency)."""
    runs: dict[str, list[_Load]] = {name: [] for name in urls}
    for i in range(ROUNDS):
        for name, url in urls.items():
            if i == 0 or name != "one-at-a-time":
                runs[name].append(asyncio.run(_open_loop(url, prompts, n, rate, count)))
    return {name: min(loads, key=lambda load: _p99(load.latencies)) for name, loads in runs.items()}


def _row(measure: str, kubellm: float, baseline: float, goal: str, note: str) -> dict:
    ratio = kubellm / baseline
    ok = None
    if goal.startswith((">=", "<=")):
        target = float(goal.split()[1].rstrip("x"))
        ok = ratio >= target if goal.startswith(">=") else ratio <= target
    return {
        "benchmark": "serve",
        "measure": measure,
        "kubellm": kubellm,
        "baseline": baseline,
        "ratio": ratio,
        "goal": goal,
        "ok": ok,
        "note": note,
    }


def _health_probes(url: str, seconds: float) -> list[float]:
    """Latencies (s) of back-to-back readiness probes for ``seconds``."""
    import httpx

    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=10) as http:
        while time.monotonic() < deadline:
            t = time.perf_counter()
            http.get(f"{url}/v2/health/ready")
            latencies.append(time.perf_counter() - t)
    return latencies


def _health_under_abuse(url: str, seconds: float) -> tuple[list[float], list[float]]:
    """Readiness latencies idle, then while 3 clients keep sending 20 MB bodies (refused with 413):
    what a kubelet's probe sees while the predictor is abused (tests/serve/test_limits.py checks that
    the probe never fails; this measures how fast it stays)."""
    import threading

    import httpx

    idle = _health_probes(url, seconds)
    stop = threading.Event()
    body = b'{"model": "kubellm", "prompt": "' + b"a" * (20 * 2**20) + b'"}'

    def abuse() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):  # the server may close a refused upload early
                    http.post(
                        f"{url}/openai/v1/completions", content=body, headers={"content-type": "application/json"}
                    )

    workers = [threading.Thread(target=abuse, daemon=True) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        busy = _health_probes(url, seconds)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    return idle, busy


def _open_loop_rows(share: float, runs: dict[str, _Load], note: str) -> list[dict]:
    cont, static, single = runs["continuous"], runs["static"], runs["one-at-a-time"]
    at = f"open loop {share:.0%} of capacity"
    return [
        _row(
            f"{at}: latency p50 (s), continuous vs static",
            statistics.median(cont.latencies),
            statistics.median(static.latencies),
            "info",
            note,
        ),
        _row(
            f"{at}: latency p99 (s), continuous vs static", _p99(cont.latencies), _p99(static.latencies), "info", note
        ),
        _row(
            f"{at}: latency p99 (s), continuous vs one-at-a-time",
            _p99(cont.latencies),
            _p99(single.latencies),
            "info",
            note,
        ),
        _row(
            f"{at}: first token p50 (s), continuous vs static",
            statistics.median(cont.first_tokens),
            statistics.median(static.first_tokens),
            "info",
            note,
        ),
        _row(
            f"{at}: first token p99 (s), continuous vs static",
            _p99(cont.first_tokens),
            _p99(static.first_tokens),
            "info",
            note,
        ),
        _row(f"{at}: generated tokens/s, continuous vs static", cont.tokens_per_s, static.tokens_per_s, "info", note),
    ]


def run(quick: bool) -> list[dict]:
    return with_threads(_run, quick)


def with_threads(fn, quick: bool) -> list[dict]:  # noqa: ANN001 - a benchmark's _run
    """``fn(quick)`` with torch on ``THREADS`` intra-op threads (restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return fn(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> list[dict]:
    n = 16 if quick else 64
    per_client, sequential_requests, open_count = (1, 2, 16) if quick else (3, 4, 40)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = Path(tmp) / "model"
        _build_model(model_dir, vocab=1024 if quick else 4096)
        plain_start = _plain_startup(model_dir)
        batch = f"serve.max_batch_size={CLIENTS}"
        with (
            _server(model_dir, Path(tmp), "continuous", batch) as (cont_url, startup),
            _server(model_dir, Path(tmp), "static", batch, "serve.batching=static") as (static_url, _),
            _server(model_dir, Path(tmp), "one-at-a-time", "serve.max_batch_size=1") as (single_url, _),
        ):
            urls = {"continuous": cont_url, "static": static_url, "one-at-a-time": single_url}
            base = _Baselines(model_dir, n)
            sequential, static, alone = [], [], []
            closed: dict[str, list[_Load]] = {"continuous": [], "static": []}
            for _ in range(ROUNDS):
                tps, lat = base.sequential(sequential_requests)
                sequential.append(tps)
                alone.append(statistics.median(lat))
                static.append(base.static())
                for name in closed:
                    closed[name].append(asyncio.run(_closed_loop(urls[name], base.prompts, n, per_client)))
            capacity = max(load.requests_per_s for load in closed["continuous"])
            open_runs = {
                share: _open_loop_rounds(urls, base.prompts, n, share * capacity, open_count)
                for share in OPEN_LOOP_LOADS
            }
            idle_probes, busy_probes = _health_under_abuse(cont_url, 2 if quick else 5)
    load_avg = f"load avg {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    note = f"small preset, {n} tokens/request, {base.precision}, {THREADS} thread, {load_avg}"
    closed_note = f"{note}, {CLIENTS} clients x {per_client}, best of {ROUNDS} rounds"
    fastest = {name: max(load.tokens_per_s for load in loads) for name, loads in closed.items()}
    p99 = {name: min(_p99(load.latencies) for load in loads) for name, loads in closed.items()}
    p50 = {name: min(statistics.median(load.latencies) for load in loads) for name, loads in closed.items()}
    rows = [
        _row(
            "generated tokens/s, 8 clients (continuous) vs sequential generate",
            fastest["continuous"],
            max(sequential),
            ">= 3.5x",
            closed_note,
        ),
        _row(
            "generated tokens/s, 8 clients (continuous) vs static batch of 8",
            fastest["continuous"],
            max(static),
            ">= 0.9x",
            closed_note,
        ),
        _row(
            "request latency p99 (s), 8 clients (continuous) vs one request alone",
            p99["continuous"],
            min(alone),
            "<= 1.3x",
            closed_note,
        ),
        _row(
            "request latency p99 (s), 8 clients (static server) vs one request alone",
            p99["static"],
            min(alone),
            "info",
            closed_note,
        ),
        _row(
            "request latency p50 (s), 8 clients (continuous) vs one request alone",
            p50["continuous"],
            min(alone),
            "info",
            closed_note,
        ),
        _row(
            "generated tokens/s, 8 clients, continuous vs static server",
            fastest["continuous"],
            fastest["static"],
            "info",
            closed_note,
        ),
        _row(
            "floor: one static batch of 8 (plain generate, s) vs one request alone",
            CLIENTS * n / max(static),
            min(alone),
            "info",
            closed_note,
        ),
    ]
    for share, runs in open_runs.items():
        rows += _open_loop_rows(
            share, runs, f"{note}, {open_count} Poisson arrivals at {share * capacity:.1f}/s, best of {ROUNDS} rounds"
        )
    rows.append(_row("process start to ready (s) vs plain transformers load", startup, plain_start, "info", note))
    probe_note = f"{load_avg}, {len(idle_probes)} idle and {len(busy_probes)} abused probes, 3 clients x 20 MB bodies"
    rows += [
        _row(
            "readiness probe p50 (s), during 20 MB-body abuse vs idle",
            statistics.median(busy_probes),
            statistics.median(idle_probes),
            "<= 10x",
            probe_note,
        ),
        _row(
            "readiness probe max (s), during 20 MB-body abuse vs idle",
            max(busy_probes),
            max(idle_probes),
            "info",
            probe_note,
        ),
    ]
    return rows
