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
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubellm.config.data import DataConfig
from kubellm.data import format as fmt
from kubellm.data import sources as src_mod
from kubellm.data import tokenizer as tok_mod
from kubellm.data.clean import Cleaner
from kubellm.data.pack import (
    ArrowSink,
    Encoder,
    InstructPacker,
    PackStats,
    answer_spans,
    label_tokens,
    pack_documents,
)
from kubellm.data.report import render_report
from kubellm.errors import DataError
from kubellm.fsutil import atomic_dir, claim_output, write_json_atomic
from kubellm.log import Progress, get_logger, is_tty
from kubellm.tracking.base import Tracker

#: Bumped whenever a change here changes the prepared bytes, so old fingerprints stop matching.
PREP_VERSION = 1
SPLITS = ("train", "validation")
_WORK = ".work"
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


def fingerprint(cfg: DataConfig, *, tokenizer_dir: str | Path | None = None,
                _sources: list[src_mod.Source] | None = None) -> str:
    """Hash of the sources' content and the data config, without preparing anything.

    Input files are hashed by content (streamed), Hub datasets by their resolved revision, an existing
    tokenizer by its files (``tokenizer_dir`` overrides ``cfg.tokenizer.path`` as in :func:`prepare`);
    ``num_proc`` is left out (it changes speed, not bytes). It equals ``manifest.fingerprint`` of a prep
    with the same config and tokenizer, so a pipeline can skip unchanged data.
    """
    cfg = _effective(cfg, tokenizer_dir)
    h = hashlib.sha256(f"kubellm-prep/{PREP_VERSION}/{fmt.FORMAT_VERSION}\0".encode())
    doc = cfg.model_dump(mode="json", exclude={"num_proc", "sources"})
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
#: Text per tokenization batch. A batch's Encoding objects cost ~100 bytes per token (ids, offsets,
#: token strings), so 4 MB of text (~1.2 M tokens) peaks near 150 MB whatever the corpus size, and is
#: still enough documents to keep every core of the tokenizer's thread pool busy.
BATCH_TEXT_BYTES = 4 * 1024 * 1024


class _TextSink:
    """Cleaned examples of one split, batched into an Arrow stream file (``text`` and ``origin``);
    a batch ends at ``batch`` records or :data:`BATCH_TEXT_BYTES` characters, whichever comes first."""

    def __init__(self, path: Path, batch: int) -> None:
        import pyarrow as pa

        self._pa, self.path, self.batch = pa, path, batch
        self.schema = pa.schema([("text", pa.large_string()), ("origin", pa.string())])
        self._writer = pa.ipc.new_stream(str(path), self.schema)
        self._texts: list[str] = []
        self._origins: list[str] = []
        self._chars = 0
        self.count = 0
        self.chars = 0

    def add(self, text: str, origin: str) -> None:
        self._texts.append(text)
        self._origins.append(origin)
        self.count += 1
        self._chars += len(text)
        if len(self._texts) >= self.batch or self._chars >= BATCH_TEXT_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._texts:
            self._writer.write_batch(self._pa.record_batch([self._texts, self._origins], schema=self.schema))
            self.chars += self._chars
            self._texts, self._origins, self._chars = [], [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def _read_batches(path: Path) -> Iterator[tuple[list[str], list[str]]]:
    import pyarrow as pa

    # Plain reads, not a memory map: mapped pages stay resident and peak RSS would grow with the corpus.
    with pa.OSFile(str(path)) as f:
        for batch in pa.ipc.open_stream(f):
            yield batch.column(0).to_pylist(), batch.column(1).to_pylist()


def _split_of(key: int, seed: int, fraction: float) -> str:
    """``validation`` for a stable, seeded ``fraction`` of keys (the same record always lands alike)."""
    if fraction <= 0:
        return "train"
    digest = hashlib.blake2b(key.to_bytes(8, "little"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return "validation" if int.from_bytes(digest.digest(), "little") / 2**64 < fraction else "train"


def _collect(cfg: DataConfig, sources: list[src_mod.Source], work: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Pass 1: read, clean, de-duplicate and split into one Arrow text file per split."""
    cleaner = Cleaner(cfg.cleaning, seed=cfg.split.seed)
    sinks = {s: _TextSink(work / f"{s}.text.arrow", cfg.batch_size) for s in SPLITS}
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

        for origin, example, index in src_mod.iter_examples(cfg, sources, on_file=file_done):
            read += 1
            per_source[index] += 1
            if cfg.max_docs:
                report(read)
            admitted = cleaner.admit(example)
            if admitted is None:
                continue
            cleaned, key = admitted
            text = cleaned if isinstance(cleaned, str) else json.dumps(cleaned, ensure_ascii=False)
            sinks[_split_of(key, cfg.split.seed, cfg.split.validation_fraction)].add(text, origin)
    for s in sinks.values():
        s.close()
    kept = sinks["train"].count + sinks["validation"].count
    dropped = dict(sorted(cleaner.dropped.items()))
    if read == 0:
        raise DataError(f"{cfg.sources[0].uri}: no records read from the sources")
    if kept == 0:
        why = ", ".join(f"{k}={v}" for k, v in dropped.items())
        raise DataError(f"{cfg.sources[0].uri}: every record was dropped by cleaning (read {read}: {why}); "
                        "check data.cleaning.min_chars/max_chars")
    if sinks["train"].count == 0:
        raise DataError(f"{cfg.sources[0].uri}: all {kept} kept records fell into validation; lower "
                        "data.split.validation_fraction or add data")
    stats = {
        "records_in": read, "records_out": kept, "dropped": dropped,
        "duplicates": dropped.get("duplicate", 0), "near_duplicates": dropped.get("near_duplicate", 0),
        "sources": [{"uri": s.cfg.uri, "files": len(s.files), "records": n} for s, n in zip(sources, per_source, strict=True)],
        "split_records": {s: sinks[s].count for s in SPLITS},
        "split_chars": {s: sinks[s].chars for s in SPLITS},
    }
    return {s: sinks[s].path for s in SPLITS if sinks[s].count}, stats


# --------------------------------------------------------------------------------------------- pass 2
def _tokenizer(cfg: DataConfig, train_text: Path, n_train: int, train_chars: int) -> tuple[Any, bool]:
    if cfg.tokenizer.path is not None:
        return tok_mod.load_tokenizer(cfg.tokenizer.path), False
    budget = cfg.tokenizer.max_train_bytes
    # Characters stand in for bytes (equal for ASCII, the common case): an evenly spaced, deterministic
    # sample of records whose size fits the budget.
    fraction = 1.0 if budget is None or train_chars <= budget else budget / train_chars

    def texts(report: _Tenths) -> Iterator[str]:
        i = 0
        for batch, _ in _read_batches(train_text):
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
def _tokenize_split(cfg: DataConfig, tok: Any, encoder: Encoder, text_path: Path, split_dir: Path,
                    n_records: int, split: str, fingerprint: str) -> PackStats:
    sink = ArrowSink(split_dir)
    with _Tenths(n_records, f"prep: tokenize {split}") as report:
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            report(done)

        try:
            if cfg.kind == "pretrain":
                sizes: list[int] = []

                def texts() -> Iterator[list[str]]:
                    for batch, _ in _read_batches(text_path):
                        sizes.append(len(batch))
                        yield batch

                stats = pack_documents(encoder.docs(texts(), tok.eos_token_id), cfg.block_size, sink,
                                       on_batch=lambda: tick(sizes.pop(0)))
                stats.examples = n_records
            else:
                stats = _tokenize_instruct(cfg, tok, encoder, text_path, sink, tick)
        finally:
            sink.close(hashlib.sha256(f"{fingerprint}/{split}".encode()).hexdigest()[:16])
    return stats


def _tokenize_instruct(cfg: DataConfig, tok: Any, encoder: Encoder, text_path: Path, sink: ArrowSink,
                       tick: Any) -> PackStats:
    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    packer = InstructPacker(cfg.block_size, tok.pad_token_id, sink, pack=cfg.pack_instructions,
                            window=cfg.batch_size)
    pending: list[list[tuple[int, int]]] = []

    def rendered() -> Iterator[list[str]]:
        for batch, origins in _read_batches(text_path):
            texts = []
            for conv, origin in zip(batch, origins, strict=True):
                full, spans = answer_spans(render, json.loads(conv), origin)
                texts.append(full)
                pending.append(spans)
            yield texts

    for encoded in encoder.offsets(rendered()):
        for ids, starts in encoded:
            packer.add(ids, label_tokens(ids, starts, pending.pop(0)))
        tick(len(encoded))
    return packer.close()


def _write_heldout(text_path: Path | None, out: Path) -> int:
    n = 0
    with (out / fmt.HELDOUT).open("w", encoding="utf-8") as f:
        if text_path is None:
            return 0
        for batch, _ in _read_batches(text_path):
            for conv in batch:
                messages = json.loads(conv)
                f.write(json.dumps({"messages": messages[:-1], "reference": messages[-1]["content"]},
                                   ensure_ascii=False) + "\n")
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


def prepare(cfg: DataConfig, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
            tracker: Tracker | None = None) -> PrepResult:
    """Prepare ``cfg``'s sources into ``out_dir`` (replaced atomically) and return the result.

    ``out_dir`` must be new, empty or an earlier prepared dataset (:func:`kubellm.fsutil.claim_output`),
    and may neither contain nor lie inside a source or the tokenizer; anything else fails before work.

    ``tokenizer_dir`` overrides ``cfg.tokenizer.path``: instruction prep gets the pretraining dataset's
    tokenizer this way, so both share one vocabulary. With a ``tracker``, params, metrics and the
    ``stats.json``/``report.md`` artifacts are logged.
    """
    cfg = _effective(cfg, tokenizer_dir)
    t0 = time.perf_counter()
    sources = src_mod.resolve_all(cfg)  # bad URIs fail here, before anything is written
    out = claim_output(out_dir, OUTPUT_KIND, inputs=_local_inputs(cfg, sources))
    fp = fingerprint(cfg, _sources=sources)
    timings: dict[str, float] = {}
    with atomic_dir(out, OUTPUT_KIND) as tmp:
        work = tmp / _WORK
        work.mkdir()
        t = time.perf_counter()
        text_paths, stats = _collect(cfg, sources, work)
        timings["read_clean"] = time.perf_counter() - t

        t = time.perf_counter()
        tok, trained = _tokenizer(cfg, text_paths["train"], stats["split_records"]["train"],
                                  stats["split_chars"]["train"])
        tok.save_pretrained(str(tmp / fmt.TOKENIZER_DIR))
        timings["tokenizer"] = time.perf_counter() - t

        t = time.perf_counter()
        split_stats: dict[str, PackStats] = {}
        with Encoder(tok_mod.backend(tok), cfg.num_proc) as encoder:
            for split, path in text_paths.items():
                split_stats[split] = _tokenize_split(cfg, tok, encoder, path, tmp / fmt.DATASET_DIR / split,
                                                     stats["split_records"][split], split, fp)
        timings["tokenize_pack"] = time.perf_counter() - t
        if split_stats["train"].rows == 0:
            train = split_stats["train"]
            if cfg.kind == "instruct":
                raise DataError(f"{cfg.sources[0].uri}: no training example keeps any answer token within "
                                f"data.block_size={cfg.block_size} ({train.dropped}); raise data.block_size")
            raise DataError(f"{cfg.sources[0].uri}: the training split has {train.dropped_tail_tokens} tokens, "
                            f"fewer than one block of data.block_size={cfg.block_size}; add data or lower it")

        t = time.perf_counter()
        splits = _finish_dataset(split_stats, tmp / fmt.DATASET_DIR)
        n_heldout = _write_heldout(text_paths.get("validation"), tmp) if cfg.kind == "instruct" else 0
        shutil.rmtree(work)
        timings["save"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0

        manifest = fmt.Manifest(
            kind=cfg.kind, block_size=cfg.block_size, vocab_size=tok_mod.vocab_size(tok),
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
            fingerprint=fp, splits=splits, stop_token_ids=tok_mod.stop_token_ids(tok))
        stats = _final_stats(cfg, stats, split_stats, manifest, trained, n_heldout, timings)
        fmt.write_dataset_checksums(tmp)
        write_json_atomic(tmp / fmt.STATS, stats)
        (tmp / fmt.REPORT).write_text(render_report(cfg, stats, manifest, tok, tmp), encoding="utf-8")
        write_json_atomic(tmp / fmt.MANIFEST, manifest.to_json())  # last: its presence means complete
    log.info("prepared %s: %d records → %d rows, %d tokens in %.1f s", out, stats["records_out"],
             stats["rows"], stats["tokens"], timings["total"])
    if tracker is not None:
        _track(tracker, cfg, stats, out)
    return PrepResult(out, manifest, stats)


def _finish_dataset(split_stats: dict[str, PackStats], dest: Path) -> dict[str, int]:
    """Drop empty splits and write the ``DatasetDict`` index (the splits are already in place)."""
    splits = {}
    for split, st in split_stats.items():
        if st.rows:
            splits[split] = st.rows
        else:
            shutil.rmtree(dest / split)
    write_json_atomic(dest / "dataset_dict.json", {"splits": list(splits)})
    return splits


def _final_stats(cfg: DataConfig, stats: dict[str, Any], split_stats: dict[str, PackStats],
                 manifest: fmt.Manifest, trained: bool, n_heldout: int, timings: dict[str, float]) -> dict[str, Any]:
    tokens = sum(s.tokens for s in split_stats.values())
    padding = sum(s.padding for s in split_stats.values())
    dropped = dict(stats["dropped"])
    for s in split_stats.values():
        for reason, n in s.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    return {
        "kind": cfg.kind, "fingerprint": manifest.fingerprint, "block_size": cfg.block_size,
        **stats, "dropped": dict(sorted(dropped.items())),
        "splits": {s: {"records": stats["split_records"][s], **v.to_json()} for s, v in split_stats.items()},
        "tokens": tokens, "rows": sum(s.rows for s in split_stats.values()),
        "padding_fraction": padding / (tokens + padding) if tokens + padding else 0.0,
        "heldout": n_heldout,
        "tokenizer": {"trained": trained, "source": cfg.tokenizer.path, "vocab_size": manifest.vocab_size},
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "tokens_per_second": tokens / timings["total"] if timings["total"] > 0 else 0.0,
    }


def _track(tracker: Tracker, cfg: DataConfig, stats: dict[str, Any], out: Path) -> None:
    tracker.log_params({
        "data.kind": cfg.kind, "data.sources": ",".join(s.uri for s in cfg.sources),
        "data.block_size": cfg.block_size, "data.vocab_size": stats["tokenizer"]["vocab_size"],
        "data.tokenizer_trained": stats["tokenizer"]["trained"], "data.fingerprint": stats["fingerprint"],
        "data.max_docs": cfg.max_docs,
    })
    metrics = {"data_records_in": stats["records_in"], "data_records_out": stats["records_out"],
               "data_tokens": stats["tokens"], "data_rows": stats["rows"],
               "data_padding_fraction": stats["padding_fraction"], "data_prep_seconds": stats["seconds"]["total"]}
    metrics.update({f"data_dropped_{k}": v for k, v in stats["dropped"].items()})
    tracker.log_metrics({k: float(v) for k, v in metrics.items()})
    tracker.log_artifact(out / fmt.STATS, "data")
    tracker.log_artifact(out / fmt.REPORT, "data")
