"""Resumable checkpoints under ``<out_dir>/checkpoints/``.

::

    checkpoints/
      run.json                 what this output directory trains (the run spec), written at the start
      step-00000050/
        weights.safetensors    the trainable parameters (the whole model, or only the LoRA adapter)
        trainer.pt             optimizer and LR-scheduler state
        rng.pt                 RNG states of every rank
        state.json             step, data position (rows consumed), tokens seen, the history so far
        checksums.json         size and checksum of each file above
        COMPLETE               written last

A run with ``loop.parallelism: fsdp`` writes the trainable weights and the optimizer state with
``torch.distributed.checkpoint`` (DCP) instead of ``weights.safetensors`` and ``trainer.pt``'s optimizer
part: ``dcp/__<rank>_0.distcp`` from every rank (its own shard, keyed by parameter name and offset) and
``dcp/.metadata`` from rank 0, which says which slice of which tensor lives in which file. Reading
goes through that index, so a checkpoint written by 4 processes resumes on 2 or on 1 (and one written
by 1 on 2). Every rank fsyncs and checksums its own shard and hands the record to rank 0, which writes
the rest, ``checksums.json`` over all of it and the marker: a checkpoint counts only once every rank's
shard is complete and recorded; a truncated or missing shard fails verification like any other file.

A checkpoint is written into a hidden temporary directory; its files are checksummed, everything is
fsynced, the completion marker is written last, and only then is the directory renamed to
``step-XXXXXXXX``: a kill or a node crash at any moment leaves either the previous checkpoints or a
complete new one. :func:`latest_complete` never picks a directory without the marker (a half-copied PVC,
a crash on a filesystem without atomic rename).

A marker proves the writer finished, not that the bytes are still those it wrote (a bad disk, a
careless copy, a volume restored from a broken snapshot): random bytes in the weights resumed silently
and turned every later loss into NaN. So :func:`load_latest_verified` checks sizes and checksums, that
the files load, and that the weights are finite; a checkpoint that fails is named in one warning line
and the one before it is tried (``loop.keep_checkpoints`` keeps it); only when none passes does the run
stop, with one error line. Checksums are xxHash3-128 where the ``xxhash`` module is installed (a
``datasets`` dependency; 19 GB/s on one core here, against 1.0 GB/s for SHA-256 — 12 s per checkpoint
of a 1B model with its optimizer state), SHA-256 otherwise; they detect damage, not tampering.
A checkpoint without checksums (written by an older kubellm, or copied without its ``checksums.json``)
cannot be told from a damaged one: altered but finite weights resumed from it with only a warning. It
is skipped like a damaged one; when nothing else passes, the error line says how to proceed:
``KUBELLM_RESUME_UNVERIFIED=1`` resumes from it all the same (after the load and finiteness checks), for
a run upgraded mid-way whose checkpoints are known to be intact.

A save that fails for want of space, quota or permission (torch reports a full disk as ``unexpected
pos``) is one line naming the checkpoint and the cause (:func:`kubellm.fsutil.io_errors`); the half
written directory is removed and the checkpoints before it are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubellm.errors import TrainingError
from kubellm.fsutil import (
    checksum_record,
    fsync_path,
    fsync_tree,
    io_errors,
    verify_checksums,
    write_json_atomic,
)
from kubellm.fsutil import write_checksums as write_file_checksums
from kubellm.log import get_logger
from kubellm.models.tensors import nonfinite_names

log = get_logger("kubellm.train")

CHECKPOINTS = "checkpoints"
RUN_SPEC = "run.json"
MARKER = "COMPLETE"
WEIGHTS = "weights.safetensors"
TRAINER = "trainer.pt"
RNG = "rng.pt"
STATE = "state.json"
CHECKSUMS = "checksums.json"
#: Set to 1 to resume from a checkpoint that has no checksums (see the module doc).
RESUME_UNVERIFIED_ENV = "KUBELLM_RESUME_UNVERIFIED"

SHARDS = "dcp"
"""Sub-directory of a sharded checkpoint holding the DCP files."""
_DCP_INDEX = f"{SHARDS}/.metadata"
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
    nonfinite_streak: int = 0
    """Consecutive steps, up to this one, whose loss or gradient norm was not finite (skipped)."""
    skipped_steps: int = 0
    """Optimizer steps skipped over the whole run for a non-finite loss or gradient norm."""


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


def save_checkpoint(
    out_dir: str | Path,
    state: TrainState,
    *,
    weights: dict[str, Any],
    trainer: dict[str, Any],
    rng: list[Any],
    keep: int,
) -> Path:
    """Write a complete checkpoint for ``state.step`` and keep only the newest ``keep``."""
    from safetensors.torch import save_file

    final = checkpoint_root(out_dir) / f"step-{state.step:08d}"
    kept = latest_complete(out_dir)
    then = (
        f"; the checkpoint {kept.name} is kept: make room and rerun with the same output directory to resume from it"
        if kept
        else "; no checkpoint was written yet"
    )
    with io_errors(final, "cannot write the checkpoint", then):
        final, tmp = _begin(out_dir, state)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
            _seal(tmp, final, state, trainer, rng, {})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _prune(out_dir, keep)
    return final


def save_sharded_checkpoint(
    out_dir: str | Path,
    state: TrainState,
    ctx: Any,
    *,
    train_state: dict[str, Any],
    trainer: dict[str, Any],
    rng: list[Any],
    keep: int,
) -> Path:
    """Write a sharded checkpoint for ``state.step``: every rank calls this (it is a collective).

    ``train_state`` is :func:`kubellm.train.sharding.train_state`'s ``{"model", "optimizer"}``; every rank
    writes its own shard of it with DCP, then fsyncs and checksums the files it wrote. Rank 0 collects
    those records, writes ``trainer`` (the scheduler), ``rng``, the state, the checksums and the marker.
    A failure on any rank removes the unfinished directory and raises on every rank.
    """
    import torch.distributed.checkpoint as dcp

    from kubellm.train.dist import broadcast_object, gather_objects

    final = checkpoint_root(out_dir) / f"step-{state.step:08d}"
    made = error = None
    if ctx.is_main:  # one directory for all ranks (on a shared volume across nodes)
        try:
            made = str(_begin(out_dir, state)[1])
        except OSError as err:
            error = f"rank 0: {type(err).__name__}: {err}"
    made, error = broadcast_object(ctx, (made, error))
    if error:
        raise TrainingError(f"{final}: sharded checkpoint not written ({error})")
    tmp = Path(made)
    records: dict[str, dict[str, Any]] = {}
    try:
        with _alone_is_intended():
            dcp.save(train_state, storage_writer=dcp.FileSystemWriter(tmp / SHARDS, sync_files=True, thread_count=1))
        mine = sorted((tmp / SHARDS).glob(f"__{ctx.rank}_*.distcp"))
        if ctx.is_main:
            mine.append(tmp / _DCP_INDEX)
        records = file_records(mine, tmp)
    except Exception as err:  # reported to every rank below, then raised on all of them
        error = f"rank {ctx.rank}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    outcomes = gather_objects(ctx, (records, error))
    errors = [e for _, e in outcomes if e]
    if not errors and ctx.is_main:
        try:
            _seal(tmp, final, state, trainer, rng, {k: v for recs, _ in outcomes for k, v in recs.items()})
        except BaseException as err:
            errors.append(f"rank 0: {type(err).__name__}: {err}")
    errors = broadcast_object(ctx, errors)
    if errors:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"{final}: sharded checkpoint not written ({errors[0]})")
    if ctx.is_main:
        _prune(out_dir, keep)
    return final


@contextlib.contextmanager
def _alone_is_intended() -> Iterator[None]:
    """DCP warns on every save and load of a one-process run (no process group) that it assumes one
    process: that is what such a run is, so the warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _begin(out_dir: str | Path, state: TrainState) -> tuple[Path, Path]:
    """The final directory of ``state.step`` and a fresh hidden one to write it into."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    return final, Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))


def file_records(paths: list[Path], base: Path) -> dict[str, dict[str, Any]]:
    """Size and checksum of files (fsynced first), keyed by their path under ``base``."""
    out = {}
    for p in paths:
        fsync_path(p)
        out[p.relative_to(base).as_posix()] = checksum_record(p)
    return out


def _seal(
    tmp: Path,
    final: Path,
    state: TrainState,
    trainer: dict[str, Any],
    rng: list[Any],
    shards: dict[str, dict[str, Any]],
) -> None:
    """Write the rank-0 files, the checksums (``shards``: records made by the ranks), fsync everything,
    then the marker, and rename ``tmp`` to ``final``."""
    import torch

    torch.save(trainer, tmp / TRAINER)
    torch.save(rng, tmp / RNG)
    (tmp / STATE).write_text(json.dumps(asdict(state)), encoding="utf-8")
    write_checksums(tmp, shards)
    fsync_tree(tmp)  # the data reaches the disk before the marker that vouches for it
    (tmp / MARKER).write_text("ok\n", encoding="utf-8")
    fsync_path(tmp / MARKER)
    fsync_path(tmp)
    if final.exists():  # a rerun that reached the same step again: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


def _prune(out_dir: str | Path, keep: int) -> None:
    for _, old in complete_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, train_state: dict[str, Any] | None = None) -> Checkpoint:
    """Read a complete checkpoint (tensors on the CPU).

    A sharded one needs ``train_state`` (:func:`kubellm.train.sharding.train_state` of the model being
    trained): DCP loads into it in place, each rank reading the slices of its own shards, whatever the
    number of ranks that wrote them. It is a collective then: every rank calls it."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    try:
        state = TrainState(**json.loads((path / STATE).read_text(encoding="utf-8")))
        if is_sharded(path):
            if train_state is None:
                raise TrainingError(
                    f"{path}: a sharded checkpoint (loop.parallelism fsdp) needs the model to load into"
                )
            import torch.distributed.checkpoint as dcp

            with _alone_is_intended():
                dcp.load(train_state, storage_reader=dcp.FileSystemReader(path / SHARDS))
            weights = train_state["model"]
        else:
            weights = load_file(str(path / WEIGHTS))
        trainer = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
        rng = torch.load(path / RNG, map_location="cpu", weights_only=True)
    except (
        OSError,
        ValueError,
        TypeError,
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        SafetensorError,
        CheckpointException,
    ) as err:
        raise TrainingError(
            f"{path}: unreadable checkpoint ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]})"
        ) from None
    return Checkpoint(path, state, weights, trainer, rng)


def is_sharded(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` was written with DCP (``loop.parallelism: fsdp``)."""
    return (Path(path) / SHARDS).is_dir()


# ------------------------------------------------------------------------------------------ verification
def write_checksums(ckpt_dir: Path, recorded: dict[str, dict[str, Any]] | None = None) -> None:
    """Record size and checksum of every file of the checkpoint being written; ``recorded`` adds files
    other processes wrote and checksummed (the shards of a sharded checkpoint)."""
    write_file_checksums(
        ckpt_dir,
        [p.name for p in ckpt_dir.iterdir() if p.is_file() and p.name not in (CHECKSUMS, MARKER)],
        ckpt_dir / CHECKSUMS,
        recorded,
    )


def verify_checkpoint(path: str | Path, part: tuple[int, int] = (0, 1)) -> bool:
    """Compare every file with its recorded size and checksum. True: all match; False: nothing to
    compare with (written before checksums, or by a hash this machine lacks); raises
    :class:`TrainingError` naming the first file that differs. ``part=(i, n)`` reads only every n-th
    file from the i-th (n ranks share the reading of a sharded checkpoint; all of them check that every
    file is recorded, present and of its size)."""
    path = Path(path)
    required = (_DCP_INDEX if is_sharded(path) else WEIGHTS, TRAINER, RNG, STATE)
    return verify_checksums(path, path / CHECKSUMS, TrainingError, required=required, part=part)


def load_latest_verified(out_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint that verifies, loads and holds finite weights; ``None`` when there
    are no checkpoints (a fresh start).

    Each one that fails is named in one warning line and the one before it is tried; those skipped are
    set aside (``.step-XXXXXXXX.failed``, removed with the others when the run finishes) so they hold no
    ``keep_checkpoints`` slot and are not tried again. When none passes, :class:`TrainingError` says so
    and nothing is set aside: rerunning gives the same answer until someone looks.
    """
    found = complete_checkpoints(out_dir)
    failed: list[tuple[Path, str]] = []
    for _, path in reversed(found):
        try:
            _verify_or_refuse(path)
            c = load_checkpoint(path)
            _check_weights_finite(c)
        except TrainingError as err:
            log.warning("skipping checkpoint: %s", err)
            failed.append((path, str(err)))
            continue
        _set_aside(failed)
        return c
    _none_passes(out_dir, failed)
    return None


def load_latest_verified_sharded(
    out_dir: str | Path, ctx: Any, train_state: Callable[[], dict[str, Any]]
) -> Checkpoint | None:
    """:func:`load_latest_verified` for sharded checkpoints: every rank calls it (a collective).

    The ranks share the reading of the checksummed files (an 8 B model's checkpoint is ~96 GB); then
    every rank loads its part (DCP reshards to this run's number of ranks) and checks it is finite. A checkpoint that
    fails on any rank is skipped
    on all of them and the one before it tried, as for unsharded ones. ``train_state()`` gives the
    structure to load into, and receives the weights and optimizer state of the checkpoint returned; it
    is called only when there is a checkpoint to load (DCP's optimizer state dict of a fresh optimizer
    takes an empty step, which would shift AdamW's bias correction of a fresh start by one step)."""
    from kubellm.train.dist import broadcast_object, gather_objects

    names = broadcast_object(ctx, [str(p) for _, p in reversed(complete_checkpoints(out_dir))] if ctx.is_main else None)
    failed: list[tuple[Path, str]] = []
    target: dict[str, Any] | None = None
    for name in names:
        path, problem, c = Path(name), None, None
        try:
            _verify_or_refuse(path, (ctx.rank, ctx.world_size), warn=ctx.is_main)
        except TrainingError as err:
            problem = str(err)
        problem = next((p for p in gather_objects(ctx, problem) if p), None)
        if problem is None:
            try:
                target = target or train_state()
                c = load_checkpoint(path, target)
                _check_weights_finite(c)
            except TrainingError as err:
                problem = str(err)
            problem = next((p for p in gather_objects(ctx, problem) if p), None)
        if problem is not None:
            if ctx.is_main:
                log.warning("skipping checkpoint: %s", problem)
            failed.append((path, problem))
            continue
        if ctx.is_main:
            _set_aside(failed)
        return c
    _none_passes(out_dir, failed)
    return None


def _verify_or_refuse(path: Path, part: tuple[int, int] = (0, 1), warn: bool = True) -> None:
    """Raise unless ``path`` verifies against its checksums; one without checksums passes only when the
    user vouches for it (``KUBELLM_RESUME_UNVERIFIED=1``)."""
    if verify_checkpoint(path, part):
        return
    if os.environ.get(RESUME_UNVERIFIED_ENV) != "1":
        raise TrainingError(
            f"{path}: has no checksums to verify it against (written by an older kubellm, "
            "copied without checksums.json, or xxhash is missing here)"
        )
    if warn:
        log.warning("%s: has no checksums; resuming from it unverified (%s=1)", path, RESUME_UNVERIFIED_ENV)


def _check_weights_finite(c: Checkpoint) -> None:
    bad = nonfinite_names(c.weights)
    if bad:
        what = SHARDS if is_sharded(c.path) else WEIGHTS
        raise TrainingError(
            f"{c.path / what}: {len(bad)} of {len(c.weights)} tensors hold NaN or infinite values (e.g. {bad[0]})"
        )


def _set_aside(failed: list[tuple[Path, str]]) -> None:
    for bad_path, _ in failed:
        aside = bad_path.with_name(f".{bad_path.name}.failed")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(bad_path, aside)


def _none_passes(out_dir: str | Path, failed: list[tuple[Path, str]]) -> None:
    if failed:
        trust = (
            f", or set {RESUME_UNVERIFIED_ENV}=1 to resume from a checkpoint without checksums that you know is intact"
            if any("has no checksums" in why for _, why in failed)
            else ""
        )
        raise TrainingError(
            f"{checkpoint_root(out_dir)}: none of the {len(failed)} checkpoints passes "
            f"verification (newest: {failed[0][1]}); delete the directory to train from the "
            f"start{trust}"
        )


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
        raise TrainingError(
            f"{out_dir}: holds a run with different settings ({', '.join(changed[:5])} "
            "changed); resume it unchanged or use a new output directory"
        )


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
