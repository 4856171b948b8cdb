"""Sharded preparation: the pure steps that both engines run, and the shard bookkeeping that makes a prep
resumable.

Every record gets a stable id from its place in the sources (``rid = unit << 32 | record``, where a *unit*
is one input file, numbered across the sources in order, or a whole Hub dataset): what the local engine
reads one after the other, the Ray engine reads unit by unit on many workers, and both arrive at the same
decisions because every decision is a function of the record and its id:

- cleaning and the length limits are per record (:class:`~kubellm.data.clean.Cleaner` with
  de-duplication off);
- exact de-duplication keeps, of all records with the same normalised-text key, the one with the
  smallest id (the first in source order; the local engine sees it first, the Ray engine groups by key
  across all workers and keeps the minimum);
- the train/validation split is a seeded hash of the key (:func:`split_of`);
- kept records, in id order, are cut into *text shards* of about ``data.shard_bytes`` characters per
  split (:class:`TextShards`); each text shard is tokenized and packed on its own into one output shard
  (:func:`make_shard`), so the output does not depend on which worker did what, or how many there were.

A finished output shard is recorded by a small JSON *sidecar* (its pack statistics and
:func:`kubellm.fsutil.checksum_record`) written after the shard is in place: a resumed prep re-uses an
output shard only when its bytes still match the sidecar, and re-makes it otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kubellm.config.data import DataConfig
from kubellm.data import records as rec_mod
from kubellm.data import sources as src_mod
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
from kubellm.fsutil import checksum_record, write_json_atomic

SPLITS = ("train", "validation")
TEXT_DIR = "text"
"""Where the text shards go, under the work directory."""
#: Text per tokenization batch. A batch's Encoding objects cost ~100 bytes per token (ids, offsets,
#: token strings), so 4 MB of text (~1.2 M tokens) peaks near 150 MB whatever the corpus size, and is
#: still enough documents to keep every core of the tokenizer's thread pool busy.
BATCH_TEXT_BYTES = 4 * 1024 * 1024
UNIT_BITS = 32


def rid(unit: int, record: int) -> int:
    """The stable id of record ``record`` of unit ``unit`` (source order is id order)."""
    return (unit << UNIT_BITS) | record


def split_of(key: int, seed: int, fraction: float) -> str:
    """``validation`` for a stable, seeded ``fraction`` of keys (the same record always lands alike)."""
    if fraction <= 0:
        return "train"
    digest = hashlib.blake2b(key.to_bytes(8, "little"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return "validation" if int.from_bytes(digest.digest(), "little") / 2**64 < fraction else "train"


def as_text(cleaned: str | list[dict[str, str]]) -> str:
    """What a text shard stores: the text, or the cleaned messages as JSON."""
    return cleaned if isinstance(cleaned, str) else json.dumps(cleaned, ensure_ascii=False)


# --------------------------------------------------------------------------------------------- units
def units(sources: list[src_mod.Source]) -> list[tuple[int, int, src_mod.InputFile | None]]:
    """``(unit index, source index, file)`` of every independently readable unit, in source order."""
    out = []
    for si, source in enumerate(sources):
        for f in source.units():
            out.append((len(out), si, f))
    return out


def unit_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("unit", pa.int64()),
            ("record", pa.int64()),
            ("rid", pa.int64()),
            ("drop", pa.string()),
            ("key", pa.uint64()),
            ("split", pa.string()),
            ("text", pa.large_string()),
            ("origin", pa.string()),
        ]
    )


def read_unit(cfg: DataConfig, source: src_mod.Source, unit: int, f: src_mod.InputFile | None) -> Iterator[Any]:
    """Every record of one unit, read, mapped and cleaned (not de-duplicated), as Arrow tables of about
    :data:`BATCH_TEXT_BYTES` of text: a dropped record keeps its row (``drop`` names the reason, no
    text), so caps and counts can be applied afterwards exactly as the local engine applies them."""
    import pyarrow as pa

    schema = unit_schema()
    cleaner = Cleaner(cfg.cleaning.model_copy(update={"dedup": False}), seed=cfg.split.seed)
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    chars = 0
    for i, (origin, rec) in enumerate(source.file_records(f, cfg.max_record_bytes)):
        admitted = cleaner.admit(rec_mod.checked_example(cfg, rec, source, origin))
        if admitted is None:
            (reason,) = cleaner.dropped  # cleared after every record: the one reason of this one
            row = (unit, i, rid(unit, i), reason, 0, "", "", origin)
        else:
            cleaned, key = admitted
            text = as_text(cleaned)
            chars += len(text)
            row = (
                unit,
                i,
                rid(unit, i),
                "",
                key,
                split_of(key, cfg.split.seed, cfg.split.validation_fraction),
                text,
                origin,
            )
        for name, value in zip(schema.names, row, strict=True):
            cols[name].append(value)
        cleaner.dropped.clear()
        if chars >= BATCH_TEXT_BYTES:
            yield pa.table(cols, schema=schema)
            cols, chars = {name: [] for name in schema.names}, 0
    if cols["unit"]:
        yield pa.table(cols, schema=schema)


# --------------------------------------------------------------------------------------------- text shards
@dataclass(frozen=True)
class TextShard:
    """Kept records ``index``-th of ``split``: ``records`` records, ``chars`` characters, in ``path``
    (relative to the work directory)."""

    split: str
    index: int
    path: str
    records: int
    chars: int


class TextShards:
    """Kept records of every split, in id order, cut into Arrow text shards (``text``, ``origin``) of
    about ``shard_bytes`` characters; inside a shard, batches end at ``batch`` records or
    :data:`BATCH_TEXT_BYTES` characters."""

    def __init__(self, root: Path, folder: str, shard_bytes: int, batch: int) -> None:
        import pyarrow as pa

        self._pa, self.root, self.folder = pa, root, folder
        (root / folder).mkdir(parents=True, exist_ok=True)
        self.shard_bytes, self.batch = shard_bytes, batch
        self.schema = pa.schema([("text", pa.large_string()), ("origin", pa.string())])
        self.done: dict[str, list[TextShard]] = {s: [] for s in SPLITS}
        self._open: dict[str, dict[str, Any]] = {}

    def add(self, split: str, text: str, origin: str) -> None:
        cur = self._open.get(split)
        if cur is None:
            n = len(self.done[split])
            rel = f"{self.folder}/{split}-{n:05d}.arrow"
            cur = self._open[split] = {
                "rel": rel,
                "writer": self._pa.ipc.new_stream(str(self.root / rel), self.schema),
                "texts": [],
                "origins": [],
                "pending": 0,
                "records": 0,
                "chars": 0,
            }
        cur["texts"].append(text)
        cur["origins"].append(origin)
        cur["records"] += 1
        cur["chars"] += len(text)
        cur["pending"] += len(text)
        if len(cur["texts"]) >= self.batch or cur["pending"] >= BATCH_TEXT_BYTES:
            self._flush(cur)
        if cur["chars"] >= self.shard_bytes:
            self._close(split)

    def _flush(self, cur: dict[str, Any]) -> None:
        if cur["texts"]:
            cur["writer"].write_batch(self._pa.record_batch([cur["texts"], cur["origins"]], schema=self.schema))
            cur["texts"], cur["origins"], cur["pending"] = [], [], 0

    def _close(self, split: str) -> None:
        cur = self._open.pop(split)
        self._flush(cur)
        cur["writer"].close()
        self.done[split].append(TextShard(split, len(self.done[split]), cur["rel"], cur["records"], cur["chars"]))

    def close(self) -> dict[str, list[TextShard]]:
        for split in list(self._open):
            self._close(split)
        return self.done


def read_batches(path: Path) -> Iterator[Any]:
    """The record batches of one Arrow stream file (a text shard, or a Ray worker's spilled unit)."""
    import pyarrow as pa

    # Plain reads, not a memory map: mapped pages stay resident and peak RSS would grow with the corpus.
    with pa.OSFile(str(path)) as f:
        yield from pa.ipc.open_stream(f)


def read_texts(path: Path) -> Iterator[tuple[list[str], list[str]]]:
    """``(texts, origins)`` batches of one text shard."""
    for batch in read_batches(path):
        yield batch.column(0).to_pylist(), batch.column(1).to_pylist()


def text_shards_to_json(shards: dict[str, list[TextShard]]) -> dict[str, list[dict[str, Any]]]:
    return {s: [asdict(t) for t in v] for s, v in shards.items()}


def text_shards_from_json(doc: dict[str, list[dict[str, Any]]]) -> dict[str, list[TextShard]]:
    return {s: [TextShard(**t) for t in v] for s, v in doc.items()}


# --------------------------------------------------------------------------------------------- output shards
@dataclass(frozen=True)
class ShardJob:
    """Tokenize and pack text shard ``text`` (under ``work``) into output shard ``out`` (under the
    staging directory); ``sidecar`` records it when done."""

    split: str
    index: int
    of: int
    records: int
    text: str
    out: str
    sidecar: str

    @property
    def name(self) -> str:
        return f"{self.split}/{Path(self.out).name}"


def shard_file(split: str, index: int, of: int) -> str:
    """An output shard's path under the prepared directory (``load_from_disk``'s naming)."""
    return f"dataset/{split}/data-{index:05d}-of-{of:05d}.arrow"


def make_shard(cfg: DataConfig, tok: Any, encoder: Encoder, job: ShardJob, root: Path, work: Path) -> dict[str, Any]:
    """Tokenize and pack one text shard into its output shard; return (and write) its sidecar record.

    The shard is written under a temporary name and renamed, and the sidecar written after it, so a
    retried or killed task leaves either a recorded, complete shard or nothing a resumed prep trusts.
    """
    out = root / job.out
    sink = ArrowSink(out.parent, path=out)
    text_path = work / job.text
    try:
        if cfg.kind == "pretrain":
            stats = pack_documents(
                encoder.docs((t for t, _ in read_texts(text_path)), tok.eos_token_id), cfg.block_size, sink
            )
            stats.examples = job.records
        else:
            stats = _tokenize_instruct(cfg, tok, encoder, text_path, sink)
    finally:
        sink.close()
    record = {"stats": stats.to_json(), "records": job.records, "file": checksum_record(out)}
    write_json_atomic(work / job.sidecar, record)
    return record


def _tokenize_instruct(cfg: DataConfig, tok: Any, encoder: Encoder, text_path: Path, sink: ArrowSink) -> PackStats:
    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    packer = InstructPacker(cfg.block_size, tok.pad_token_id, sink, pack=cfg.pack_instructions, window=cfg.batch_size)
    pending: list[list[tuple[int, int]]] = []

    def rendered() -> Iterator[list[str]]:
        for batch, origins in read_texts(text_path):
            texts = []
            for conv, origin in zip(batch, origins, strict=True):
                full, spans = answer_spans(render, json.loads(conv), origin)
                texts.append(full)
                pending.append(spans)
            yield texts

    for encoded in encoder.offsets(rendered()):
        for ids, starts in encoded:
            packer.add(ids, label_tokens(ids, starts, pending.pop(0)))
    return packer.close()


def recorded(root: Path, work: Path, job: ShardJob) -> dict[str, Any] | None:
    """The sidecar of ``job`` when its output shard is in place with the recorded size and checksum."""
    try:
        record = json.loads((work / job.sidecar).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    out = root / job.out
    if not out.is_file() or out.stat().st_size != record.get("file", {}).get("bytes"):
        return None
    return record if checksum_record(out) == record["file"] else None
