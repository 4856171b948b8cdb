"""A cluster job's inputs and output on the shared PVC.

A PyTorchJob/TrainJob/RayJob's pods cannot see the launching step's KFP artifacts, so the step copies its
inputs to the ReadWriteMany volume that it and the job's pods both mount at
:data:`~kubellm.k8s.jobspec.SHARED_MOUNT`, the job works there (a training job resuming from its own
checkpoints, a prep RayJob from the shards it already verified), and the step copies the output back.
A training job's directory is keyed by run name, stage and data fingerprint, so a retried step finds the
data already there and re-attaches to the running job; a prep job's by run name, stage and the hash of its
data config (the fingerprint covers the sources' content, which only the job reads).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from kubellm.fsutil import atomic_dir


@dataclass(frozen=True)
class SharedWork:
    """One stage's directories on the shared volume."""

    data: Path
    out: Path
    base: Path | None


def stage_inputs(
    mount: str | Path,
    run_name: str,
    stage: str,
    fingerprint: str,
    data_dir: str | Path,
    base_model: str | Path | None = None,
) -> SharedWork:
    """Copy the prepared data (and the base model) to the shared volume unless a complete copy is there."""
    work = _work(mount, run_name, stage, fingerprint)
    shared = SharedWork(work / "data", work / "output", work / "base" if base_model is not None else None)
    _copy_once(data_dir, shared.data, "manifest.json")
    if base_model is not None and shared.base is not None:
        _copy_once(base_model, shared.base, "config.json")
    return shared


def stage_prep(
    mount: str | Path, run_name: str, stage: str, key: str, tokenizer_dir: str | Path | None = None
) -> tuple[Path, Path | None]:
    """The prep job's output directory on the shared volume and (instruction data) the copy there of the
    tokenizer it reuses: only the tokenizer's own files, not the weights of a model directory."""
    from kubellm.data.tokenizer import TOKENIZER_FILES, tokenizer_source

    work = _work(mount, run_name, stage, key)
    if tokenizer_dir is None:
        return work / "output", None
    src = tokenizer_source(tokenizer_dir)
    dest = work / "tokenizer"
    if not (dest / "tokenizer_config.json").is_file() and not (dest / "tokenizer.json").is_file():
        with atomic_dir(dest) as tmp:
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
    return work / "output", dest


def _work(mount: str | Path, run_name: str, stage: str, key: str) -> Path:
    return Path(mount) / "runs" / run_name / f"{stage}-{key[:16]}"


def _copy_once(src: str | Path, dest: Path, complete_marker: str) -> None:
    if not (dest / complete_marker).is_file():
        with atomic_dir(dest) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)


def collect_output(out: Path, out_dir: str | Path) -> None:
    """Copy the job's output into the step's artifact; checkpoints stay on the volume."""
    shutil.copytree(out, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
