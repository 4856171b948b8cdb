"""Helpers for the data-preparation tests: tiny synthetic corpora and small configs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from kubellm.config.data import DataConfig

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega", "river", "stone", "cloud", "tree", "light", "shadow", "number", "letter"]


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
    doc: dict[str, Any] = {"kind": "pretrain", "sources": [source], "block_size": 32,
                           "tokenizer": {"vocab_size": 320}, "split": {"validation_fraction": 0.2},
                           "cleaning": {"min_chars": 4}}
    for k, v in kw.items():
        doc[k] = {**doc[k], **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    return DataConfig.model_validate(doc)


def leftovers(parent: Path) -> list[str]:
    """Anything a failed prep left beside its output (there must be nothing)."""
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []
