"""``kubellm prep``: sources → cleaned, de-duplicated, split, tokenized, packed dataset directory.

The stage runs in four streaming passes inside a temporary directory that replaces ``out_dir`` only when
everything is written (:func:`kubellm.fsutil.atomic_dir`), so a failed prep never leaves a directory that
looks valid:

1. read every source, clean, de-duplicate and split each record by a seeded hash of its normalised
   text; kept records go to one Arrow file per split (memory stays flat as the corpus grows);
2. train a byte-level BPE on the training split, or load the given tokenizer;
3. encode in batches and pack into rows (:mod:`kubellm.data.pack`);
4. save the ``DatasetDict``, the tokenizer, ``heldout.jsonl`` (instruct), ``stats.json``, ``report.md``
   and, last, ``manifest.json`` (layout in :mod:`kubellm.data.format`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubellm.config.data import DataConfig
from kubellm.data import format as fmt
from kubellm.data import records as rec_mod
from kubellm.data import sources as src_mod
from kubellm.data import tokenizer as tok_mod
from kubellm.data.clean import Cleaner
from kubellm.data.pack import Encoder, PackStats, write_split_metadata
from kubellm.data.report import render_report
from kubellm.data.shards import (
    SPLITS,
    TEXT_DIR,
    ShardJob,
    TextShard,
    TextShards,
    as_text,
    make_shard,
    read_texts,
    recorded,
    shard_file,
    split_of,
    text_shards_from_json,
    text_shards_to_json,
)
from kubellm.errors import DataError, SourceError
from kubellm.fsutil import (
    checksum_record,
    claim_output,
    install_dir,
    verify_checksums,
    write_checksums,
    write_json_atomic,
)
from kubellm.log import Progress, get_logger, is_tty
from kubellm.tracking.base import Tracker

#: Bumped whenever a change here changes the prepared bytes, so old fingerprints stop matching.
PREP_VERSION = 2
_WORK = ".work"
TEXT_CHECKSUMS = "text-checksums.json"
COLLECTED = "collected.json"
SHARD_RECORDS = "shards"
OUTPUT_KIND = "prepared-dataset"
log = get_logger("kubellm.data")


@dataclass(frozen=True)
class PrepResult:
    """A finished prep: where it is, its manifest, and the contents of ``stats.json``."""

    path: Path
    manifest: fmt.Manifest
    stats: dict[str, Any]


# --------------------------------------------------------------------------------------------- fingerprint
def _effective(cfg: DataConfig, tokenizer_dir: str | Path | None) -> DataConfig:
    if tokenizer_dir is None:
        return cfg
    return cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"path": str(tokenizer_dir)})})


def _hash_tokenizer(root: Path) -> str:
    """Content hash of the files a tokenizer loads from, not of the whole directory: a model directory
    passed as the tokenizer also holds gigabytes of weights that do not change the token ids."""
    h = hashlib.sha256()
    for name in tok_mod.TOKENIZER_FILES:
        p = root / name
        if p.is_file():
            h.update(f"{name}\0".encode())
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def fingerprint(
    cfg: DataConfig, *, tokenizer_dir: str | Path | None = None, _sources: list[src_mod.Source] | None = None
) -> str:
    """Hash of the sources' content and the data config, without preparing anything.

    Input files are hashed by content (streamed), Hub datasets by their resolved revision, an existing
    tokenizer by its files (``tokenizer_dir`` overrides ``cfg.tokenizer.path`` as in :func:`prepare`);
    ``num_proc``, ``engine``, ``workers`` and ``cluster`` are left out (they change speed, not bytes). It equals
    ``manifest.fingerprint`` of a prep
    with the same config and tokenizer, so a pipeline can skip unchanged data.
    """
    cfg = _effective(cfg, tokenizer_dir)
    h = hashlib.sha256(f"kubellm-prep/{PREP_VERSION}/{fmt.FORMAT_VERSION}\0".encode())
    doc = cfg.model_dump(mode="json", exclude={"num_proc", "sources", "engine", "workers", "cluster"})
    if cfg.tokenizer.path is not None:
        doc["tokenizer"]["path"] = _hash_tokenizer(tok_mod.tokenizer_source(cfg.tokenizer.path))
    h.update(json.dumps(doc, sort_keys=True).encode())
    for source in _sources if _sources is not None else src_mod.resolve_all(cfg):
        source.fingerprint(h)
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------- progress
class _Tenths:
    """Reports irregular progress (records in batches of any size) at each tenth and at the end, so a
    pod log gets about ten lines per phase however large the corpus."""

    def __init__(self, total: int, description: str) -> None:
        self.total = max(1, total)
        self.progress = Progress(self.total, description, every=1, logger=log)
        self._last = 0  # first line at 10 %
        self._every_call = is_tty()  # a terminal bar may redraw on every batch

    def __call__(self, done: int) -> None:
        tenth = 10 * done // self.total
        if tenth > self._last or self._every_call:
            self._last = tenth
            self.progress.update(min(done, self.total))

    def __enter__(self) -> _Tenths:
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.close()


# --------------------------------------------------------------------------------------------- pass 1
def _collect(
    cfg: DataConfig, sources: list[src_mod.Source], work: Path
) -> tuple[dict[str, list[TextShard]], dict[str, Any]]:
    """Pass 1 (local engine): read, clean, de-duplicate and split into text shards, in one sequential pass."""
    cleaner = Cleaner(cfg.cleaning, seed=cfg.split.seed)
    sinks = TextShards(work, TEXT_DIR, cfg.shard_bytes, cfg.batch_size)
    per_source: list[int] = [0] * len(sources)
    n_files = sum(max(1, len(s.files)) for s in sources)
    read = 0
    # Progress in files, or in records when max_docs caps the read before the last file.
    with _Tenths(cfg.max_docs or n_files, "prep: read " + ("records" if cfg.max_docs else "files")) as report:
        files_done = 0

        def file_done() -> None:
            nonlocal files_done
            files_done += 1
            if not cfg.max_docs:
                report(files_done)

        for origin, example, index in rec_mod.iter_examples(cfg, sources, on_file=file_done):
            read += 1
            per_source[index] += 1
            if cfg.max_docs:
                report(read)
            admitted = cleaner.admit(example)
            if admitted is None:
                continue
            cleaned, key = admitted
            sinks.add(split_of(key, cfg.split.seed, cfg.split.validation_fraction), as_text(cleaned), origin)
    return sinks.close(), collect_stats(cfg, sources, read, per_source, dict(cleaner.dropped), sinks.done)


def collect_stats(
    cfg: DataConfig,
    sources: list[src_mod.Source],
    read: int,
    per_source: list[int],
    dropped: dict[str, int],
    shards: dict[str, list[TextShard]],
) -> dict[str, Any]:
    """Pass 1's statistics, refusing a corpus that leaves nothing to train on (both engines)."""
    records = {s: sum(t.records for t in shards[s]) for s in SPLITS}
    kept = sum(records.values())
    dropped = dict(sorted((k, v) for k, v in dropped.items() if v))
    if read == 0:
        raise DataError(f"{cfg.sources[0].uri}: no records read from the sources")
    if kept == 0:
        why = ", ".join(f"{k}={v}" for k, v in dropped.items())
        raise DataError(
            f"{cfg.sources[0].uri}: every record was dropped by cleaning (read {read}: {why}); "
            "check data.cleaning.min_chars/max_chars"
        )
    if records["train"] == 0:
        raise DataError(
            f"{cfg.sources[0].uri}: all {kept} kept records fell into validation; lower "
            "data.split.validation_fraction or add data"
        )
    return {
        "records_in": read,
        "records_out": kept,
        "dropped": dropped,
        "duplicates": dropped.get("duplicate", 0),
        "near_duplicates": dropped.get("near_duplicate", 0),
        "sources": [
            {"uri": s.cfg.uri, "files": len(s.files), "records": n} for s, n in zip(sources, per_source, strict=True)
        ],
        "split_records": records,
        "split_chars": {s: sum(t.chars for t in shards[s]) for s in SPLITS},
        "shards": {s: len(shards[s]) for s in SPLITS},
    }


# --------------------------------------------------------------------------------------------- pass 2
def _tokenizer(cfg: DataConfig, work: Path, train: list[TextShard], n_train: int, train_chars: int) -> tuple[Any, bool]:
    if cfg.tokenizer.path is not None:
        return tok_mod.load_tokenizer(cfg.tokenizer.path), False
    budget = cfg.tokenizer.max_train_bytes
    # Characters stand in for bytes (equal for ASCII, the common case): an evenly spaced, deterministic
    # sample of records whose size fits the budget.
    fraction = 1.0 if budget is None or train_chars <= budget else budget / train_chars

    def texts(report: _Tenths) -> Iterator[str]:
        i = 0
        for shard in train:
            for batch, _ in read_texts(work / shard.path):
                for rec in batch:
                    take = int((i + 1) * fraction) > int(i * fraction)
                    i += 1
                    if not take:
                        continue
                    if cfg.kind == "pretrain":
                        yield rec
                    else:
                        yield from (m["content"] for m in json.loads(rec))
                report(i)

    # The trainer counts words while it reads (the slow part, reported here); merges take seconds.
    with _Tenths(n_train, "prep: train tokenizer (reading)") as report:
        where = ", ".join(s.uri for s in cfg.sources)
        return tok_mod.train_tokenizer(texts(report), cfg.tokenizer, length=int(n_train * fraction), where=where), True


# --------------------------------------------------------------------------------------------- pass 3
def _make_local(cfg: DataConfig, jobs: list[ShardJob], root: Path, work: Path) -> None:
    """Pass 3 (local engine): the shards one after the other, each encoded by ``num_proc`` processes."""
    if not jobs:
        return
    tok = tok_mod.load_tokenizer(root / fmt.TOKENIZER_DIR)
    with (
        Encoder(tok_mod.backend(tok), cfg.num_proc) as encoder,
        _Tenths(sum(j.records for j in jobs), "prep: tokenize") as report,
    ):
        done = 0
        for job in jobs:
            make_shard(cfg, tok, encoder, job, root, work)
            done += job.records
            report(done)


def _write_heldout(work: Path, shards: list[TextShard], out: Path) -> int:
    n = 0
    with (out / fmt.HELDOUT).open("w", encoding="utf-8") as f:
        for shard in shards:
            for batch, _ in read_texts(work / shard.path):
                for conv in batch:
                    messages = json.loads(conv)
                    f.write(
                        json.dumps(
                            {"messages": messages[:-1], "reference": messages[-1]["content"]}, ensure_ascii=False
                        )
                        + "\n"
                    )
                    n += 1
    return n


# --------------------------------------------------------------------------------------------- prepare
def claim_prepared_output(cfg: DataConfig, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """The check :func:`prepare` makes first (sources resolve, ``out_dir`` may receive a prepared dataset
    and holds none of the inputs), for callers that must refuse before doing anything else."""
    cfg = _effective(cfg, tokenizer_dir)
    return claim_output(out_dir, OUTPUT_KIND, inputs=_local_inputs(cfg, src_mod.resolve_all(cfg)))


def _local_inputs(cfg: DataConfig, sources: list[src_mod.Source]) -> list[Path]:
    """What prep reads from this disk: local source paths as written (a directory source must not hold
    the output, or the next prep reads its own ``heldout.jsonl``), one file per folder of the files
    they name (enough to tell whether the output would contain them), and a reused tokenizer."""
    found = [Path(s.cfg.uri.strip().removeprefix("file://")) for s in sources if s.kind == "files"]
    per_folder: dict[Path, Path] = {}
    for s in sources:
        for f in s.files if s.kind == "files" else ():
            if "://" not in f.name:
                per_folder.setdefault(Path(f.name).parent, Path(f.name))
    return [*found, *per_folder.values(), *([Path(cfg.tokenizer.path)] if cfg.tokenizer.path else [])]


def prepare(
    cfg: DataConfig, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None, tracker: Tracker | None = None
) -> PrepResult:
    """Prepare ``cfg``'s sources into ``out_dir`` (replaced atomically) and return the result.

    ``out_dir`` must be new, empty or an earlier prepared dataset (:func:`kubellm.fsutil.claim_output`),
    and may neither contain nor lie inside a source or the tokenizer; anything else fails before work.

    ``tokenizer_dir`` overrides ``cfg.tokenizer.path``: instruction prep gets the pretraining dataset's
    tokenizer this way, so both share one vocabulary. With a ``tracker``, params, metrics and the
    ``stats.json``/``report.md`` artifacts are logged.

    Work happens in a hidden staging directory beside ``out_dir`` named by the fingerprint
    (``.<name>.prep-<fingerprint>``). Bad input removes it; any other failure (a killed driver, a full
    disk) leaves it, and the next prep of the same data resumes from it: pass 1's text shards, the
    tokenizer and every output shard that still verifies are kept, the rest is made again. Output shards
    of an earlier complete prep in ``out_dir`` with the same fingerprint are re-used the same way, so a
    damaged shard there is re-made alone.
    """
    cfg = _effective(cfg, tokenizer_dir)
    t0 = time.perf_counter()
    sources = src_mod.resolve_all(cfg)  # bad URIs fail here, before anything is written
    out = claim_output(out_dir, OUTPUT_KIND, inputs=_local_inputs(cfg, sources))
    fp = fingerprint(cfg, _sources=sources)
    staging = out.parent / f".{out.name}.prep-{fp}"
    if staging.is_dir():
        log.info("resuming the prep of %s from %s", out, staging)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        manifest, stats = _prepare_in(cfg, sources, fp, staging, out, t0)
    except (DataError, SourceError):
        shutil.rmtree(staging, ignore_errors=True)  # bad input: a resumed prep could not do better
        raise
    except BaseException:
        log.error("prep of %s stopped; its finished parts stay in %s for the next prep of the same data", out, staging)
        raise
    install_dir(staging, out, OUTPUT_KIND)
    for stale in out.parent.glob(f".{out.name}.prep-*"):  # our own staging of other data, now superseded
        shutil.rmtree(stale, ignore_errors=True)
    log.info(
        "prepared %s: %d records → %d rows, %d tokens in %.1f s",
        out,
        stats["records_out"],
        stats["rows"],
        stats["tokens"],
        stats["seconds"]["total"],
    )
    if tracker is not None:
        _track(tracker, cfg, stats, out)
    return PrepResult(out, manifest, stats)


def _prepare_in(
    cfg: DataConfig, sources: list[src_mod.Source], fp: str, tmp: Path, out: Path, t0: float
) -> tuple[fmt.Manifest, dict[str, Any]]:
    work = tmp / _WORK
    work.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    engine = _engine(cfg)

    t = time.perf_counter()
    done = work / COLLECTED
    collected = _read_json(done)
    if collected is not None and _text_verified(work):
        shards, stats = text_shards_from_json(collected["shards"]), collected["stats"]
        log.info("prep: re-using the cleaned text of an earlier attempt (%d records)", stats["records_out"])
    else:
        shutil.rmtree(work / TEXT_DIR, ignore_errors=True)
        shards, stats = engine.collect(cfg, sources, work) if engine else _collect(cfg, sources, work)
        write_checksums(work, [t.path for v in shards.values() for t in v], work / TEXT_CHECKSUMS)
        write_json_atomic(done, {"shards": text_shards_to_json(shards), "stats": stats})
    timings["read_clean"] = time.perf_counter() - t

    t = time.perf_counter()
    tok_done = work / "tokenizer.json"
    trained = (_read_json(tok_done) or {}).get("trained")
    if trained is None or not (tmp / fmt.TOKENIZER_DIR / "tokenizer.json").is_file():
        tok, trained = _tokenizer(
            cfg, work, shards["train"], stats["split_records"]["train"], stats["split_chars"]["train"]
        )
        shutil.rmtree(tmp / fmt.TOKENIZER_DIR, ignore_errors=True)
        tok.save_pretrained(str(tmp / fmt.TOKENIZER_DIR))
        write_json_atomic(tok_done, {"trained": trained})
    tok = tok_mod.load_tokenizer(tmp / fmt.TOKENIZER_DIR)
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    jobs = [
        ShardJob(
            split,
            t_.index,
            len(shards[split]),
            t_.records,
            t_.path,
            shard_file(split, t_.index, len(shards[split])),
            f"{SHARD_RECORDS}/{split}-{t_.index:05d}.json",
        )
        for split in SPLITS
        for t_ in shards[split]
    ]
    todo = [j for j in jobs if recorded(tmp, work, j) is None and not _reuse(j, fp, out, tmp, work)]
    if len(todo) < len(jobs):
        log.info(
            "prep: %d of %d shards verified from an earlier attempt; making %d",
            len(jobs) - len(todo),
            len(jobs),
            len(todo),
        )
    if engine:
        engine.make_shards(cfg, todo, tmp, work)
    else:
        _make_local(cfg, todo, tmp, work)
    split_stats: dict[str, PackStats] = {s: PackStats() for s in SPLITS if shards[s]}
    per_shard = []
    for job in jobs:
        rec = recorded(tmp, work, job)
        if rec is None:
            raise DataError(f"{tmp / job.out}: shard missing or damaged after it was made")
        split_stats[job.split].add(PackStats.from_json(rec["stats"]))
        per_shard.append(
            {
                "split": job.split,
                "index": job.index,
                "file": job.out,
                "records": job.records,
                "rows": rec["stats"]["rows"],
                "tokens": rec["stats"]["tokens"],
                "stats": rec["stats"],
                **rec["file"],
            }
        )
    timings["tokenize_pack"] = time.perf_counter() - t
    if split_stats["train"].rows == 0:
        train = split_stats["train"]
        if cfg.kind == "instruct":
            raise DataError(
                f"{cfg.sources[0].uri}: no training example keeps any answer token within "
                f"data.block_size={cfg.block_size} ({train.dropped}); raise data.block_size"
            )
        raise DataError(
            f"{cfg.sources[0].uri}: the training split has {train.dropped_tail_tokens} tokens, "
            f"fewer than one block of data.block_size={cfg.block_size}; add data or lower it"
        )

    t = time.perf_counter()
    splits = _finish_dataset(split_stats, jobs, fp, tmp / fmt.DATASET_DIR)
    n_heldout = _write_heldout(work, shards["validation"], tmp) if cfg.kind == "instruct" else 0
    timings["save"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    manifest = fmt.Manifest(
        kind=cfg.kind,
        block_size=cfg.block_size,
        vocab_size=tok_mod.vocab_size(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        fingerprint=fp,
        splits=splits,
        stop_token_ids=tok_mod.stop_token_ids(tok),
    )
    stats = _final_stats(cfg, stats, split_stats, manifest, trained, n_heldout, timings)
    stats["engine"] = cfg.engine
    write_json_atomic(tmp / fmt.SHARDS, {"shards": [r for r in per_shard if r["split"] in splits]})
    fmt.write_dataset_checksums(tmp)
    write_json_atomic(tmp / fmt.STATS, stats)
    (tmp / fmt.REPORT).write_text(render_report(cfg, stats, manifest, tok, tmp), encoding="utf-8")
    shutil.rmtree(work)
    write_json_atomic(tmp / fmt.MANIFEST, manifest.to_json())  # last: its presence means complete
    return manifest, stats


def _engine(cfg: DataConfig) -> Any:
    """The Ray engine module for ``engine: ray`` (imported only then: it imports Ray), else ``None``."""
    if cfg.engine != "ray":
        return None
    from kubellm.data import ray_engine

    return ray_engine


def _text_verified(work: Path) -> bool:
    """The text shards of an earlier attempt are all there, whole (else pass 1 runs again)."""
    try:
        return verify_checksums(work, work / TEXT_CHECKSUMS, DataError, what="text shard")
    except DataError as err:
        log.warning("prep: %s; cleaning the sources again", err)
        return False


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _reuse(job: ShardJob, fp: str, out: Path, tmp: Path, work: Path) -> bool:
    """Copy ``job``'s shard from an earlier complete prep of the same data in ``out`` when it verifies."""
    manifest = _read_json(out / fmt.MANIFEST)
    if manifest is None or manifest.get("fingerprint") != fp:
        return False
    listed = {r["file"]: r for r in (_read_json(out / fmt.SHARDS) or {}).get("shards", [])}
    rec = listed.get(job.out)
    src = out / job.out
    if rec is None or "stats" not in rec or not src.is_file() or src.stat().st_size != rec.get("bytes"):
        return False
    if checksum_record(src) != {"bytes": rec["bytes"], "digest": rec["digest"]}:
        log.warning("prep: %s does not match its checksum; making it again", src)
        return False
    dest = tmp / job.out
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)  # same volume: no copy (the old output is replaced as a whole, never written)
    except OSError:
        shutil.copyfile(src, dest)
    write_json_atomic(
        work / job.sidecar, {"stats": rec["stats"], "records": job.records, "file": checksum_record(dest)}
    )
    return True


def _finish_dataset(split_stats: dict[str, PackStats], jobs: list[ShardJob], fp: str, dest: Path) -> dict[str, int]:
    """Drop empty splits and write each split's ``load_from_disk`` metadata and the ``DatasetDict`` index."""
    splits = {}
    for split, st in split_stats.items():
        if st.rows:
            splits[split] = st.rows
            names = [Path(j.out).name for j in jobs if j.split == split]
            write_split_metadata(dest / split, names, hashlib.sha256(f"{fp}/{split}".encode()).hexdigest()[:16])
        else:
            shutil.rmtree(dest / split, ignore_errors=True)
    write_json_atomic(dest / "dataset_dict.json", {"splits": list(splits)})
    return splits


def _final_stats(
    cfg: DataConfig,
    stats: dict[str, Any],
    split_stats: dict[str, PackStats],
    manifest: fmt.Manifest,
    trained: bool,
    n_heldout: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    tokens = sum(s.tokens for s in split_stats.values())
    padding = sum(s.padding for s in split_stats.values())
    dropped = dict(stats["dropped"])
    for s in split_stats.values():
        for reason, n in s.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    return {
        "kind": cfg.kind,
        "fingerprint": manifest.fingerprint,
        "block_size": cfg.block_size,
        **stats,
        "dropped": dict(sorted(dropped.items())),
        "splits": {s: {"records": stats["split_records"][s], **v.to_json()} for s, v in split_stats.items()},
        "tokens": tokens,
        "rows": sum(s.rows for s in split_stats.values()),
        "padding_fraction": padding / (tokens + padding) if tokens + padding else 0.0,
        "heldout": n_heldout,
        "tokenizer": {"trained": trained, "source": cfg.tokenizer.path, "vocab_size": manifest.vocab_size},
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "tokens_per_second": tokens / timings["total"] if timings["total"] > 0 else 0.0,
    }


def _track(tracker: Tracker, cfg: DataConfig, stats: dict[str, Any], out: Path) -> None:
    tracker.log_params(
        {
            "data.kind": cfg.kind,
            "data.sources": ",".join(s.uri for s in cfg.sources),
            "data.block_size": cfg.block_size,
            "data.vocab_size": stats["tokenizer"]["vocab_size"],
            "data.tokenizer_trained": stats["tokenizer"]["trained"],
            "data.fingerprint": stats["fingerprint"],
            "data.max_docs": cfg.max_docs,
        }
    )
    metrics = {
        "data_records_in": stats["records_in"],
        "data_records_out": stats["records_out"],
        "data_tokens": stats["tokens"],
        "data_rows": stats["rows"],
        "data_padding_fraction": stats["padding_fraction"],
        "data_prep_seconds": stats["seconds"]["total"],
    }
    metrics.update({f"data_dropped_{k}": v for k, v in stats["dropped"].items()})
    tracker.log_metrics({k: float(v) for k, v in metrics.items()})
    tracker.log_artifact(out / fmt.STATS, "data")
    tracker.log_artifact(out / fmt.REPORT, "data")
