"""Fixtures for the training tests: tiny prepared datasets made by ``kubellm.data.prepare``.

The corpus is deliberately easy to learn (counting sequences and a few fixed sentence templates), so a
~0.1 M-parameter model shows a clear loss drop within tens of steps on a CPU.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest

from kubellm.tracking.base import NullTracker

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
NAMES = ["alice", "bob", "carol", "dave"]
FRUITS = ["apples", "pears", "plums", "figs"]


def toy_documents(n: int, seed: int = 0) -> list[str]:
    """Learnable text: counting runs and ``<name> likes <fruit>.`` sentences."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        if rng.random() < 0.5:
            start, length = rng.randrange(0, 6), rng.randrange(4, 8)
            docs.append(" ".join(NUMBERS[start : start + length]) + ".")
        else:
            docs.append(" ".join(f"{rng.choice(NAMES)} likes {rng.choice(FRUITS)}." for _ in range(3)))
    return docs


def toy_pairs(n: int, seed: int = 1) -> list[tuple[str, str]]:
    """Instruction pairs: ``repeat: <three numbers>`` → the same three numbers (a copy task)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = " ".join(rng.choice(NUMBERS) for _ in range(3))
        pairs.append((f"repeat: {words}", words))
    return pairs


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def toy_section(root: Path, kind: str, records: list[dict], *, block_size: int, packed: bool = False) -> dict:
    """The data config section of ``records`` written to a local JSONL file under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    # variable-length instruction rows unless packed, so padding and masking are exercised
    return {
        "kind": kind,
        "sources": [{"uri": str(_jsonl(root / f"{kind}.jsonl", records))}],
        "block_size": block_size,
        "tokenizer": {"vocab_size": 330},
        "split": {"validation_fraction": 0.1},
        "pack_instructions": packed,
        "cleaning": {"min_chars": 1},
    }


def prepare_toy(
    root: Path,
    kind: str,
    records: list[dict],
    *,
    block_size: int,
    tokenizer_dir: Path | None = None,
    packed: bool = False,
) -> Path:
    """A prepared dataset made by the real ``kubellm.data.prepare.prepare`` from a local JSONL file."""
    from kubellm.config.data import DataConfig
    from kubellm.data.prepare import prepare

    cfg = DataConfig.model_validate(toy_section(root, kind, records, block_size=block_size, packed=packed))
    return prepare(cfg, root / "prepared", tokenizer_dir=tokenizer_dir).path


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_process():
    """Tiny models gain nothing from a second intra-op thread, and on 2 cores shared with other jobs
    OpenMP's spinning threads made these tests 10× slower; subprocesses inherit OMP_NUM_THREADS."""
    import os

    import torch

    previous, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(previous)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared pretraining dataset of the toy corpus: 32-token packed blocks, its own tokenizer."""
    docs = [{"text": t} for t in toy_documents(700, seed=2)]
    return prepare_toy(tmp_path_factory.mktemp("pretrain"), "pretrain", docs, block_size=32)


@pytest.fixture(scope="session")
def instruct_data(tmp_path_factory: pytest.TempPathFactory, pretrain_data: Path) -> Path:
    """A prepared instruction dataset sharing the pretraining tokenizer (prompts masked, rows padded)."""
    from kubellm.data.format import TOKENIZER_DIR

    pairs = [{"prompt": p, "response": r} for p, r in toy_pairs(400, seed=4)]
    return prepare_toy(
        tmp_path_factory.mktemp("instruct"),
        "instruct",
        pairs,
        block_size=64,
        tokenizer_dir=pretrain_data / TOKENIZER_DIR,
    )


class SigtermAt(NullTracker):
    """A tracker that sends this process a real SIGTERM when the loop logs a given step (preemption)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, step)
        if step == self.step:
            signal.raise_signal(signal.SIGTERM)


@pytest.fixture(scope="session")
def sigterm_at():
    return SigtermAt


@pytest.fixture(scope="session")
def packed_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Pretraining and packed instruction data in 128-token blocks (every row full: the memory planner's
    sequence length), and their config sections."""
    from kubellm.data.format import TOKENIZER_DIR

    root = tmp_path_factory.mktemp("packed")
    docs = [{"text": t} for t in toy_documents(1500, seed=2)]
    pairs = [{"prompt": p, "response": r} for p, r in toy_pairs(800, seed=4)]
    pre = prepare_toy(root / "pretrain", "pretrain", docs, block_size=128)
    ins = prepare_toy(
        root / "instruct", "instruct", pairs, block_size=128, tokenizer_dir=pre / TOKENIZER_DIR, packed=True
    )
    sections = {
        "pretrain": toy_section(root / "pretrain", "pretrain", docs, block_size=128),
        "instruct": toy_section(root / "instruct", "instruct", pairs, block_size=128, packed=True),
    }
    return pre, ins, sections
