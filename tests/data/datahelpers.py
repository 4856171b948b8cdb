"""Helpers for the data-preparation tests: tiny synthetic corpora and small configs."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubellm.config.data import DataConfig

BIN = Path(sys.executable).parent

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "river",
    "stone",
    "cloud",
    "tree",
    "light",
    "shadow",
    "number",
    "letter",
]


def make_docs(n: int, seed: int = 0, words: int = 40) -> list[str]:
    """``n`` distinct pseudo-random documents of ``words`` words (deterministic)."""
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def data_cfg(uri: str | Path, **kw: Any) -> DataConfig:
    """A small, fast pretraining config over one source; ``kw`` overrides top-level fields."""
    source = {"uri": str(uri), **kw.pop("source", {})}
    doc: dict[str, Any] = {
        "kind": "pretrain",
        "sources": [source],
        "block_size": 32,
        "tokenizer": {"vocab_size": 320},
        "split": {"validation_fraction": 0.2},
        "cleaning": {"min_chars": 4},
    }
    for k, v in kw.items():
        doc[k] = {**doc[k], **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    return DataConfig.model_validate(doc)


def leftovers(parent: Path) -> list[str]:
    """Anything a failed prep left beside its output (there must be nothing)."""
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def prep_command(out: Path, sets: list[str]) -> list[str]:
    """``kubellm prep --out out`` with ``sets`` as ``--set`` arguments."""
    return [str(BIN / "kubellm"), "prep", "--out", str(out), *(a for kv in sets for a in ("--set", kv))]


def timed_prep(cwd: Path, out: Path, sets: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall seconds and output (stdout and stderr) of a successful ``kubellm prep --out out`` in a new
    process (as a resubmitted job's driver is)."""
    t = time.perf_counter()
    done = subprocess.run(prep_command(out, sets), cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    assert done.returncode == 0, done.stdout + done.stderr
    return seconds, done.stdout + done.stderr


def kill_prep_after_a_shard(
    cwd: Path, out: Path, staging: Path, sets: list[str], env: dict[str, str] | None = None, shards: int = 1
) -> int:
    """Run ``kubellm prep --out out`` with ``sets`` and SIGKILL it (no clean-up at all) as soon as
    ``shards`` output shards are recorded in ``staging``; return the number recorded by then."""
    proc = subprocess.Popen(
        prep_command(out, sets), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 240
    while len(list((staging / ".work" / "shards").glob("*.json"))) < shards:
        assert proc.poll() is None, f"prep ended before {shards} shard(s) were made: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"not {shards} shard(s) made within 240 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    return len(list((staging / ".work" / "shards").glob("*.json")))


def killable(root: Path, n: int = 3000) -> tuple[DataConfig, list[str]]:
    """A corpus of ``n`` documents and 40 duplicates cut into many small shards: its config, and the same
    as ``kubellm prep`` ``--set`` arguments."""
    docs = make_docs(n)
    corpus = write_jsonl(root / "c.jsonl", [{"text": d} for d in docs + docs[:40]])
    sets = [
        f'data.sources=[{{"uri": "{corpus}"}}]',
        "data.shard_bytes=2000",
        "data.block_size=32",
        "data.tokenizer.vocab_size=320",
        "data.split.validation_fraction=0.2",
        "data.cleaning.min_chars=4",
    ]
    return data_cfg(corpus, shard_bytes=2000), sets
