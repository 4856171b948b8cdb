"""A training job's inputs and output on the shared PVC.

A PyTorchJob/TrainJob's pods cannot see the launching step's KFP artifacts, so the step copies its
inputs to the ReadWriteMany volume that it and the job's pods both mount at
:data:`~kubellm.k8s.training_job.SHARED_MOUNT`, the job trains there (resuming from its own checkpoints
when a worker restarts), and the step copies the output back. The directory is keyed by run name, stage
and data fingerprint, so a retried step finds the data already there and re-attaches to the running job.
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


def stage_inputs(mount: str | Path, run_name: str, stage: str, fingerprint: str, data_dir: str | Path,
                 base_model: str | Path | None = None) -> SharedWork:
    """Copy the prepared data (and the base model) to the shared volume unless a complete copy is there."""
    work = Path(mount) / "runs" / run_name / f"{stage}-{fingerprint[:16]}"
    shared = SharedWork(work / "data", work / "output", work / "base" if base_model is not None else None)
    _copy_once(data_dir, shared.data, "manifest.json")
    if base_model is not None and shared.base is not None:
        _copy_once(base_model, shared.base, "config.json")
    return shared


def _copy_once(src: str | Path, dest: Path, complete_marker: str) -> None:
    if not (dest / complete_marker).is_file():
        with atomic_dir(dest) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)


def collect_output(shared: SharedWork, out_dir: str | Path) -> None:
    """Copy the job's output into the step's artifact; checkpoints stay on the volume."""
    shutil.copytree(shared.out, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
