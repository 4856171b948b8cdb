"""Data preparation, side by side with plain tokenizer calls, on the built-in corpus (the stdlib source).

- end-to-end tokens/s of ``prepare`` (read, clean, de-duplicate, split, tokenize, pack, save; the
  tokenizer given, so BPE training is not timed) against the Rust tokenizer's own ``encode_batch`` and
  ``encode_batch_fast`` on the same texts already in memory (goal ≥ 0.7×), and against a naive
  per-record ``tokenizer(text)`` loop (goal ≥ 1.5×);
- padding of packed blocks against per-document padding (goal < 1 %);
- peak RSS of ``kubellm prep`` (a subprocess, tokenizer training included) on two generated corpora,
  one ten times the other (goal < 3 GB, and the larger no more than 1.5× the smaller).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BLOCK = 256
VOCAB = 4096


def _best(fn, repeat: int) -> tuple[float, int]:
    """Fastest of ``repeat`` runs (the machine is shared: the minimum is the least disturbed)."""
    best, out = float("inf"), 0
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _row(measure: str, kubellm: float, baseline: float, goal: str, ok: bool, note: str = "") -> dict:
    return {
        "benchmark": "prep",
        "measure": measure,
        "kubellm": round(kubellm, 4),
        "baseline": round(baseline, 4),
        "ratio": round(kubellm / baseline, 3) if baseline else None,
        "goal": goal,
        "ok": ok,
        "note": note,
    }


def _throughput(work: Path, repeat: int) -> tuple[list[dict], Path]:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from kubellm.config.data import DataConfig
    from kubellm.data import builtin
    from kubellm.data.prepare import prepare

    base = {
        "kind": "pretrain",
        "block_size": BLOCK,
        "cleaning": {"max_chars": 10**7},
        "split": {"validation_fraction": 0.05},
    }
    tok_prep = prepare(
        DataConfig.model_validate(
            {**base, "sources": [{"uri": "builtin://stdlib"}], "max_docs": 200, "tokenizer": {"vocab_size": VOCAB}}
        ),
        work / "tok",
    )
    tok_dir = tok_prep.path / "tokenizer"
    cfg = DataConfig.model_validate(
        {**base, "sources": [{"uri": "builtin://stdlib"}], "tokenizer": {"path": str(tok_dir)}}
    )
    root = builtin.stdlib_root()
    texts = [r["text"] for _, r in builtin.iter_stdlib(builtin.stdlib_files(root), root)]
    rust = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    hf = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))

    def batched(method):
        def go() -> int:
            n = 0
            for i in range(0, len(texts), 1000):
                n += sum(len(e.ids) for e in method(texts[i : i + 1000], add_special_tokens=False))
            return n

        return go

    def naive() -> int:
        return sum(len(hf(t, add_special_tokens=False)["input_ids"]) for t in texts)

    t_enc, n_enc = _best(batched(rust.encode_batch), repeat)
    t_fast, n_fast = _best(batched(rust.encode_batch_fast), repeat)
    t_naive, n_naive = _best(naive, repeat)
    results = []

    def one_prep() -> int:
        results.append(prepare(cfg, work / "prep"))
        s = results[-1].stats
        return s["tokens"] + sum(sp["dropped_tail_tokens"] for sp in s["splits"].values())

    t_prep, n_prep = _best(one_prep, repeat)
    stats = results[-1].stats
    prep_tps = n_prep / t_prep
    mb = sum(len(t.encode()) for t in texts) / 1e6
    note = f"{len(texts)} modules, {mb:.1f} MB, {n_prep / 1e6:.2f} M tokens, prep {t_prep:.2f} s"
    rows = [
        _row(
            "end-to-end tok/s vs encode_batch",
            prep_tps,
            n_enc / t_enc,
            ">= 0.7x",
            prep_tps >= 0.7 * n_enc / t_enc,
            note,
        ),
        _row(
            "end-to-end tok/s vs encode_batch_fast",
            prep_tps,
            n_fast / t_fast,
            ">= 0.7x",
            prep_tps >= 0.7 * n_fast / t_fast,
            "stricter: the no-offsets fast path prep itself uses",
        ),
        _row(
            "end-to-end tok/s vs per-record tokenizer(text)",
            prep_tps,
            n_naive / t_naive,
            ">= 1.5x",
            prep_tps >= 1.5 * n_naive / t_naive,
            "PreTrainedTokenizerFast called once per module",
        ),
    ]
    # Per-document padding: every document (plus EOS) padded up to a multiple of the block size.
    lengths = [len(e.ids) + 1 for e in rust.encode_batch_fast(texts, add_special_tokens=False)]
    per_doc = sum(-n % BLOCK for n in lengths) / sum(n + (-n % BLOCK) for n in lengths)
    rows.append(
        _row(
            "padding fraction, packed vs per-document",
            stats["padding_fraction"],
            per_doc,
            "< 1 %",
            stats["padding_fraction"] < 0.01,
            f"block_size {BLOCK}",
        )
    )
    return rows, tok_dir


def _corpus(path: Path, megabytes: int) -> None:
    """JSONL of stdlib modules repeated, each copy made unique so exact de-duplication keeps it."""
    from kubellm.data import builtin

    root = builtin.stdlib_root()
    modules = [r["text"] for _, r in builtin.iter_stdlib(builtin.stdlib_files(root), root)]
    target, size, k = megabytes * 1_000_000, 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            line = json.dumps({"text": f"# copy {k}\n{modules[k % len(modules)]}"}) + "\n"
            f.write(line)
            size += len(line)
            k += 1


def _peak_rss_mb(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Peak RSS (MB) and wall seconds of ``cmd``, measured by a fresh wrapper process's
    ``getrusage(RUSAGE_CHILDREN)`` so one run's peak never leaks into the next."""
    probe = (
        "import resource, subprocess, sys, time; t = time.time(); "
        "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t, rc)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=cwd, capture_output=True, text=True, check=True)
    kb, secs, rc = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}")
    return int(kb) / 1024, float(secs)


def _memory(work: Path, quick: bool) -> list[dict]:
    small, large = (5, 50) if quick else (50, 500)
    kubellm = str(Path(sys.executable).parent / "kubellm")
    peaks = {}
    for mb in (small, large):
        corpus = work / f"corpus-{mb}mb.jsonl"
        _corpus(corpus, mb)
        cfg = {
            "data": {
                "kind": "pretrain",
                "sources": [{"uri": str(corpus)}],
                "block_size": BLOCK,
                "tokenizer": {"vocab_size": VOCAB},
            }
        }
        (work / f"run-{mb}.yaml").write_text(yaml.safe_dump(cfg))
        peaks[mb] = _peak_rss_mb([kubellm, "prep", "--config", f"run-{mb}.yaml", "--out", f"out-{mb}"], work)
        corpus.unlink()
    (rss_s, sec_s), (rss_l, sec_l) = peaks[small], peaks[large]
    note = f"{small} MB in {sec_s:.0f} s, {large} MB in {sec_l:.0f} s (tokenizer trained in both)"
    return [
        _row(
            f"peak RSS MB, {large} MB vs {small} MB corpus",
            rss_l,
            rss_s,
            "< 3 GB, <= 1.5x",
            rss_l < 3072 and rss_l <= 1.5 * rss_s,
            note,
        )
    ]


def run(quick: bool) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-prep-") as tmp:
        work = Path(tmp)
        rows, _ = _throughput(work, repeat=1 if quick else 3)
        rows += _memory(work, quick)
    return rows
