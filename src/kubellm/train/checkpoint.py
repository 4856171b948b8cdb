"""Resumable checkpoints under ``<out_dir>/checkpoints/``.

::

    checkpoints/
      run.json                 what this output directory trains (the run spec), written at the start
      step-00000050/
        weights.safetensors    the trainable parameters (the whole model, or only the LoRA adapter)
        trainer.pt             optimizer and LR-scheduler state
        rng.pt                 RNG states of every rank
        state.json             step, data position (rows consumed), tokens seen, the history so far
        COMPLETE               written last

A checkpoint is written into a hidden temporary directory, the completion marker is written last, and
only then is the directory renamed to ``step-XXXXXXXX``; a kill at any moment leaves either the previous
checkpoints or a complete new one. :func:`latest_complete` never picks a directory without the marker
(a half-copied PVC, a crash on a filesystem without atomic rename).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubellm.errors import TrainingError
from kubellm.fsutil import write_json_atomic

CHECKPOINTS = "checkpoints"
RUN_SPEC = "run.json"
MARKER = "COMPLETE"
WEIGHTS = "weights.safetensors"
TRAINER = "trainer.pt"
RNG = "rng.pt"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """Where a run stands; everything here is plain JSON."""

    step: int = 0
    samples_seen: int = 0
    """Rows of the training stream consumed by the whole job (the data position)."""
    tokens_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    """The history.jsonl lines logged so far."""
    world_size: int = 1
    window: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """The open logging window, summed over ranks: nll, target tokens, input tokens."""
    window_seconds: float = 0.0
    """Wall time the open logging window had run."""


@dataclass
class Checkpoint:
    path: Path
    state: TrainState
    weights: dict[str, Any]
    trainer: dict[str, Any]
    rng: list[Any]


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def complete_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_complete(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or ``None`` (a fresh start)."""
    found = complete_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(out_dir: str | Path, state: TrainState, *, weights: dict[str, Any],
                    trainer: dict[str, Any], rng: list[Any], keep: int) -> Path:
    """Write a complete checkpoint for ``state.step`` and keep only the newest ``keep``."""
    import torch
    from safetensors.torch import save_file

    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        torch.save(trainer, tmp / TRAINER)
        torch.save(rng, tmp / RNG)
        (tmp / STATE).write_text(json.dumps(asdict(state)), encoding="utf-8")
        (tmp / MARKER).write_text("ok\n", encoding="utf-8")
        if final.exists():  # a rerun that reached the same step again: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in complete_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a complete checkpoint (tensors on the CPU)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = TrainState(**json.loads((path / STATE).read_text(encoding="utf-8")))
        weights = load_file(str(path / WEIGHTS))
        trainer = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
        rng = torch.load(path / RNG, map_location="cpu", weights_only=True)
    except (OSError, ValueError, TypeError, RuntimeError, pickle.UnpicklingError) as err:
        raise TrainingError(f"{path}: unreadable checkpoint ({str(err).splitlines()[0]}); delete it to "
                            "resume from the one before") from None
    return Checkpoint(path, state, weights, trainer, rng)


def remove_checkpoints(out_dir: str | Path) -> None:
    """Drop the step checkpoints of a finished run (the run spec stays)."""
    root = checkpoint_root(out_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def check_run_spec(out_dir: str | Path, spec: dict[str, Any]) -> None:
    """Refuse an output directory whose recorded run spec differs from ``spec``.

    Resuming with a different model, data, optimizer or schedule would silently mix two runs; logging
    and checkpointing intervals, precision and the number of processes may change between attempts.
    """
    path = checkpoint_root(out_dir) / RUN_SPEC
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    old_flat, new_flat = _flatten(old), _flatten(json.loads(json.dumps(spec, default=str)))
    changed = sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))
    if changed:
        raise TrainingError(f"{out_dir}: holds a run with different settings ({', '.join(changed[:5])} "
                            "changed); resume it unchanged or use a new output directory")


def record_run_spec(out_dir: str | Path, spec: dict[str, Any]) -> None:
    """Record what ``out_dir`` trains (once; later attempts are checked against it)."""
    path = checkpoint_root(out_dir) / RUN_SPEC
    if not path.is_file():
        write_json_atomic(path, spec)


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(doc, dict):
        return {prefix: doc}
    out: dict[str, Any] = {}
    for k, v in doc.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
