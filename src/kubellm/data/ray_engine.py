"""The Ray engine of ``kubellm prep`` (``data.engine: ray``): the same steps as the local engine, run as
Ray Data transformations across a Ray cluster's workers. The only module of :mod:`kubellm.data` that
imports Ray (``kubellm[ray]``).

Pass 1 (read, clean, de-duplicate, split), as a Ray Data plan:

1. one row per *unit* (an input file, or a Hub dataset), consecutive units in blocks (up to four per
   worker) → ``map_batches`` runs :func:`kubellm.data.shards.read_unit` on each unit of a block, on as
   many workers as ``data.workers`` allows. The worker writes the kept records' text to the unit's
   *spill file* (an Arrow stream under the work directory, a shared volume on a cluster) and returns a
   row per record read, dropped ones included, without its text: ids, drop reason, de-duplication key.
   The caps ``max_docs``/``max_records`` and the drop counts are applied to those rows exactly as the
   local engine applies them (by record id);
2. exact de-duplication is global: ``groupby(key)`` partitions the kept records' ``(key, id)`` pairs
   across the cluster (Ray Data's task-based sort shuffle, which runs in the pool's warm workers, not
   the default hash shuffle's freshly started aggregator actors) and keeps, per key, the record with
   the smallest id (the first in source order, the one the local engine keeps); the others' ids are the
   duplicates;
3. the driver reads the spill files unit by unit (each in record order: the kept records in id order)
   into the text shards (:class:`~kubellm.data.shards.TextShards`), skipping the records over a cap and
   the duplicates. Ray's object store holds only the rows of step 1 (~50 bytes a record) and the blocks
   in flight, never the text: the text would have to stay somewhere until the duplicates are known, and
   held in the object store it made the driver's peak memory grow with the corpus (18 → 185 MB of
   object-store pages mapped by the driver for 20 → 200 MB of JSONL, ``make bench``); a file costs one
   more sequential write and read of the kept text and no memory.

Pass 3 (tokenize and pack): one Ray Data row per text shard → ``map_batches`` runs
:func:`kubellm.data.shards.make_shard`, each task writing its output shard straight to the staging
directory (a shared volume on a cluster) under a temporary name, renamed when complete, and its checksum
sidecar last. Ray retries a task whose worker died (``max_retries``), so a killed worker costs only its
in-flight units or shards; a killed driver leaves the staging directory for the next prep to resume.

Pass 2 (the tokenizer) stays on the driver: it reads an evenly spaced sample of at most
``tokenizer.max_train_bytes`` (100 MB by default) whatever the corpus size.

Not distributed: MinHash near-duplicate removal (a greedy pass in record order; refused with this
engine by the config), and the driver's single stream of the spilled text into text shards (one
sequential read and write of the kept text, cheap beside tokenization; a corpus whose text the driver's
volume cannot stream at the needed rate would want that step distributed too).

``ray.init`` joins the cluster named by ``RAY_ADDRESS`` (what a RayJob's entrypoint gets), reuses an
already connected Ray, or else starts a local one on this machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from kubellm.config.data import DataConfig
from kubellm.data import sources as src_mod
from kubellm.data import tokenizer as tok_mod
from kubellm.data.pack import Encoder
from kubellm.data.shards import (
    TEXT_DIR,
    UNIT_BITS,
    ShardJob,
    TextShard,
    TextShards,
    make_shard,
    read_batches,
    read_unit,
    unit_schema,
    units,
)
from kubellm.errors import KubellmError
from kubellm.log import get_logger

log = get_logger("kubellm.data")
#: A task whose worker process or node died is run again this many times (application errors are not
#: retried: bad input fails the same way every time).
MAX_RETRIES = 3
_TOKENIZERS: dict[str, Any] = {}
SPILL_DIR = "spill"
"""Where pass 1's workers put the text they read, one Arrow stream file per unit, under the work directory."""
RECORD_MASK = (1 << UNIT_BITS) - 1
_SPILLED = ("rid", "split", "text", "origin")


def init() -> Any:
    """The ``ray`` module, connected: to ``RAY_ADDRESS`` when set, to a Ray already initialised in this
    process, or to a new local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, configure_logging=False, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own lines report each phase
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True  # blocks reach the driver in dataset order
    return ray


@contextlib.contextmanager
def _keep_message() -> Iterator[None]:
    """In a task: a kubellm error keeps its own message in an attribute (Ray Data appends advice to the
    message of an exception from a task; the attribute travels with the pickled exception)."""
    try:
        yield
    except KubellmError as err:
        err.kubellm_message = str(err)  # type: ignore[attr-defined]
        raise


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    """A kubellm error raised in a Ray task, re-raised as itself: one line, not Ray's wrapped traceback."""
    try:
        yield
    except Exception as err:
        cause = _kubellm_cause(err)
        if cause is None:
            raise
        raise type(cause)(getattr(cause, "kubellm_message", None) or str(cause).splitlines()[0]) from None


def _kubellm_cause(err: BaseException) -> KubellmError | None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, KubellmError) and not isinstance(cause, BaseException):
            return e
        todo += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]
    return None


def _remote_args(cfg: DataConfig) -> dict[str, Any]:
    import ray

    return {
        "compute": ray.data.TaskPoolStrategy(size=cfg.workers),
        "num_cpus": 1,
        "max_retries": MAX_RETRIES,
        "retry_exceptions": False,
    }


# --------------------------------------------------------------------------------------------- pass 1
def collect(
    cfg: DataConfig, sources: list[src_mod.Source], work: Path
) -> tuple[dict[str, list[TextShard]], dict[str, Any]]:
    """Pass 1 on Ray Data: the text shards and pass-1 statistics, equal to the local engine's."""
    from ray.data.context import ShuffleStrategy

    from kubellm.data.prepare import collect_stats

    ray = init()
    plan = units(sources)

    spill = work / SPILL_DIR
    shutil.rmtree(spill, ignore_errors=True)  # an earlier attempt's, never trusted
    spill.mkdir(parents=True)

    def read(batch: Any) -> Iterator[Any]:
        with _keep_message():
            for unit, si in zip(batch["unit"].to_pylist(), batch["source"].to_pylist(), strict=True):
                yield from _spilled(read_unit(cfg, sources[si], unit, plan[unit][2]), spill / _spill_name(unit))

    with _one_line():
        items = [{"unit": u, "source": si} for u, si, _ in plan]
        # A task per block of consecutive units: one per unit for a few large files, a handful per worker
        # for thousands of small ones (each Ray task costs milliseconds of scheduling).
        parallel = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # What stays in the object store is one small row per record read (ids, drop reason, key): the
        # text went to the unit's spill file in the worker.
        records = (
            ray.data.from_items(items, override_num_blocks=min(len(items), 4 * parallel))
            .map_batches(read, batch_size=None, batch_format="pyarrow", **_remote_args(cfg))
            .materialize()
        )
        counts = _counts(records)
        per_unit: dict[int, int] = {}
        for (unit, _), n in counts.items():
            per_unit[unit] = per_unit.get(unit, 0) + n
        allowed = _caps(cfg, plan, per_unit)
        if allowed is not None:
            cap = np.asarray(allowed, dtype=np.int64)
            records = records.map_batches(
                lambda t: t.filter(t["record"].to_numpy() < cap[t["unit"].to_numpy()]), batch_format="pyarrow"
            ).materialize()
            counts = _counts(records)
        else:
            allowed = [per_unit.get(u, 0) for u, _, _ in plan]
        per_source = [0] * len(sources)
        for (_, si, _), n in zip(plan, allowed, strict=True):
            per_source[si] += n
        dropped: dict[str, int] = {}
        for (_, reason), n in counts.items():
            dropped[reason] = dropped.get(reason, 0) + n
        dropped.pop("", 0)  # kept, not dropped
        duplicates = np.empty(0, dtype=np.int64)
        if cfg.cleaning.dedup:
            # Only (key, id) pairs cross the cluster; the text stays in the spill files.
            keys = records.map_batches(_keys, batch_format="pyarrow")
            # Ray Data's default (hash) shuffle starts aggregator actors, new worker processes, for every
            # groupby: 8 s of a 15 s pass 1 on 20 MB on 2 CPUs (make bench). The task-based sort shuffle
            # runs in the pool's warm workers (0.5 s there); which record a key keeps does not depend on it.
            keys.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
            later = keys.groupby("key", num_partitions=parallel).map_groups(_later, batch_format="pyarrow")
            found = [b["rid"].to_numpy() for b in later.iter_batches(batch_format="pyarrow", batch_size=None)]
            duplicates = np.sort(np.concatenate(found)) if found else duplicates
            dropped["duplicate"] = len(duplicates)
        del records, counts
    sinks = TextShards(work, TEXT_DIR, cfg.shard_bytes, cfg.batch_size)
    # Units in order, each spill file in record order: the kept records in id order, as the local engine
    # writes them, less those over a cap and the duplicates found above.
    for unit, _, _ in plan:
        for batch in read_batches(spill / _spill_name(unit)):
            ids = batch["rid"].to_numpy()
            keep = ((ids & RECORD_MASK) < allowed[unit]) & ~np.isin(ids, duplicates)
            rows = batch.filter(keep)
            for split, text, origin in zip(
                rows["split"].to_pylist(), rows["text"].to_pylist(), rows["origin"].to_pylist(), strict=True
            ):
                sinks.add(split, text, origin)
    shutil.rmtree(spill)
    read_total = sum(allowed)
    log.info("prep (ray): read %d records from %d units", read_total, len(plan))
    return sinks.close(), collect_stats(cfg, sources, read_total, per_source, dropped, sinks.done)


def _spill_name(unit: int) -> str:
    return f"unit-{unit:08d}.arrow"


def _spilled(tables: Iterator[Any], path: Path) -> Iterator[Any]:
    """In a worker: the rows of ``tables`` without their text, which goes to ``path`` instead (the kept
    records' id, split, text and origin, in record order). Written under a temporary name and renamed
    when complete: a retried task (its worker died) writes the whole unit again."""
    import pyarrow as pa
    import pyarrow.compute as pc

    full = unit_schema()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with pa.ipc.new_stream(str(tmp), pa.schema([full.field(name) for name in _SPILLED])) as out:
        for t in tables:
            out.write_table(t.filter(pc.equal(t["drop"], "")).select(list(_SPILLED)))
            yield t.drop_columns(["split", "text", "origin"])
    os.replace(tmp, path)


def _caps(cfg: DataConfig, plan: list[tuple[int, int, Any]], per_unit: dict[int, int]) -> list[int] | None:
    """Records to keep from each unit under ``max_docs`` and the sources' ``max_records`` (the first ones
    in source order, as the local engine reads them), or ``None`` without caps."""
    caps = [s.max_records for s in cfg.sources]
    if cfg.max_docs is None and all(c is None for c in caps):
        return None
    out, total, per_source = [], 0, [0] * len(cfg.sources)
    for unit, si, _ in plan:
        n = per_unit.get(unit, 0)
        if cfg.max_docs is not None:
            n = min(n, cfg.max_docs - total)
        if caps[si] is not None:
            n = min(n, caps[si] - per_source[si])  # type: ignore[operator]
        n = max(n, 0)
        out.append(n)
        total += n
        per_source[si] += n
    return out


def _counts(records: Any) -> dict[tuple[int, str], int]:
    """Records per ``(unit, drop reason)`` (``""``: kept): counted per block on the workers, summed here
    (no shuffle: the pairs are few, the records many)."""

    def count(t: Any) -> Any:

        return t.group_by(["unit", "drop"]).aggregate([("record", "count")])

    out: dict[tuple[int, str], int] = {}
    for row in records.map_batches(count, batch_format="pyarrow", batch_size=None).take_all():
        key = (int(row["unit"]), str(row["drop"]))
        out[key] = out.get(key, 0) + int(row["record_count"])
    return out


def _keys(t: Any) -> Any:
    """``(key, rid)`` of the kept records of a block."""
    import pyarrow.compute as pc

    return t.filter(pc.equal(t["drop"], "")).select(["key", "rid"])


def _later(group: Any) -> Any:
    """Of the records sharing one key, the ids of all but the first in source order (the duplicates)."""
    ids = group["rid"].to_numpy()
    return group.filter(ids != ids.min()).select(["rid"])


# --------------------------------------------------------------------------------------------- pass 3
def make_shards(cfg: DataConfig, jobs: list[ShardJob], root: Path, work: Path) -> None:
    """Tokenize and pack ``jobs`` on the cluster's workers, each writing its own output shard."""
    if not jobs:
        return
    ray = init()

    def run(batch: Any) -> dict[str, list[str]]:
        # One encoding thread per task (each task already has its CPU). Set here, in the worker, rather
        # than as the tasks' runtime_env: another runtime_env makes Ray start new worker processes for
        # these tasks instead of reusing pass 1's (seconds of start-up and imports per worker).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        done = []
        with _keep_message():
            for row in batch.to_pylist():
                job = ShardJob(**row)
                tok = _tokenizer(root)
                with Encoder(tok_mod.backend(tok), 1, overlap=True) as encoder:
                    make_shard(cfg, tok, encoder, job, root, work)
                done.append(job.name)
        return {"shard": done}

    with _one_line():
        items = [asdict(j) for j in jobs]
        made = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(run, batch_size=1, batch_format="pyarrow", **_remote_args(cfg))
            .take_all()
        )
    log.info("prep (ray): made %d shards", len(made))


def _tokenizer(root: Path) -> Any:
    """The staged tokenizer, loaded once per worker process."""
    key = str(root)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = tok_mod.load_tokenizer(root / "tokenizer")
    return _TOKENIZERS[key]
