"""Tokenize and pack: cleaned text in, rows of ``input_ids``/``labels`` out, streamed to Arrow files.

Pretraining documents are encoded in batches with the Rust tokenizer's ``encode_batch_fast`` (the fast
path: no offsets), joined with an EOS after each document and cut into blocks of exactly ``block_size``
tokens, so no block carries padding; only the final partial block (< ``block_size`` tokens) is dropped.

Instruction examples are rendered with the tokenizer's chat template, encoded with offsets, and every
token outside an assistant answer gets label -100. The answer spans come from rendering each prefix of
the conversation (``messages[:i]`` with the generation prompt, then ``messages[:i+1]``), which works for
any prefix-stable template, ours or an existing tokenizer's.

``num_proc > 1`` encodes in worker processes (spawned, each single-threaded, batches in order). We do
not use ``Dataset.map(num_proc=…)``: in datasets 5.2 it turns the tokenizers' thread pool off at the C
level for the rest of the process, halving every later encode on 2 cores
(measured: 1.1–2.2 M tok/s threaded vs half that after such a map).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kubellm.errors import DataError
from kubellm.models.losses import IGNORE_INDEX

# --------------------------------------------------------------------------------------------- encoding
_WORKER_TOK: Any = None


def _worker_init(tok_json: str) -> None:
    global _WORKER_TOK
    # One thread per worker: num_proc workers already use num_proc cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER_TOK = Tokenizer.from_str(tok_json)


def encode_docs(tk: Any, texts: list[str], eos_id: int) -> np.ndarray:
    """One flat int32 array: each document's ids followed by ``eos_id``."""
    encs = tk.encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encs]
    total = sum(map(len, ids)) + len(ids)
    return np.fromiter(itertools.chain.from_iterable(x + [eos_id] for x in ids), dtype=np.int32, count=total)


def encode_with_offsets(tk: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(ids, start offsets)`` per text."""
    out = []
    for e in tk.encode_batch(texts, add_special_tokens=False):
        out.append(
            (
                np.asarray(e.ids, dtype=np.int32),
                np.fromiter((s for s, _ in e.offsets), dtype=np.int64, count=len(e.offsets)),
            )
        )
    return out


def _worker_docs(texts: list[str], eos_id: int) -> np.ndarray:
    return encode_docs(_WORKER_TOK, texts, eos_id)


def _worker_offsets(texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    return encode_with_offsets(_WORKER_TOK, texts)


class Encoder:
    """Encodes batches in order, inline (``num_proc == 1``) or in ``num_proc`` spawned workers with at
    most ``2 × num_proc`` batches in flight (bounded memory).

    ``overlap`` (``num_proc == 1``): encode the next batches in one thread while the caller packs and
    writes the previous ones — the Rust encoder releases the GIL — as the local engine's main process
    packs while its workers encode. A Ray task (one process per shard) uses it.
    """

    def __init__(self, tk: Any, num_proc: int = 1, *, overlap: bool = False) -> None:
        self.tk = tk
        self.num_proc = num_proc
        self.overlap = overlap and num_proc == 1
        self._pool: Executor | None = None

    def __enter__(self) -> Encoder:
        if self.overlap:
            self._pool = ThreadPoolExecutor(1)
        elif self.num_proc > 1:
            import multiprocessing

            # spawn, not fork: forking after the Rust thread pool ran can deadlock the child.
            self._pool = ProcessPoolExecutor(
                self.num_proc,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(self.tk.to_str(),),
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def docs(self, batches: Iterable[list[str]], eos_id: int) -> Iterator[np.ndarray]:
        if self._pool is None:
            return (encode_docs(self.tk, b, eos_id) for b in batches)
        if self.overlap:
            return self._ordered(batches, lambda b: self._pool.submit(encode_docs, self.tk, b, eos_id))  # type: ignore[union-attr]
        return self._ordered(batches, lambda b: self._pool.submit(_worker_docs, b, eos_id))  # type: ignore[union-attr]

    def offsets(self, batches: Iterable[list[str]]) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        if self._pool is None:
            return (encode_with_offsets(self.tk, b) for b in batches)
        if self.overlap:
            return self._ordered(batches, lambda b: self._pool.submit(encode_with_offsets, self.tk, b))  # type: ignore[union-attr]
        return self._ordered(batches, lambda b: self._pool.submit(_worker_offsets, b))  # type: ignore[union-attr]

    def _ordered(self, batches: Iterable[Any], submit: Callable[[Any], Future]) -> Iterator[Any]:
        window: list[Future] = []
        for b in batches:
            window.append(submit(b))
            if len(window) >= 2 * self.num_proc:
                yield window.pop(0).result()
        for fut in window:
            yield fut.result()


# --------------------------------------------------------------------------------------------- Arrow
def row_features() -> Any:
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32"))})


_BATCH_ROWS = 1024


class ArrowSink:
    """Writes one split straight into its ``save_to_disk`` directory: Arrow stream shards of at most
    ``max_shard_bytes`` plus the ``state.json``/``dataset_info.json`` that ``load_from_disk`` reads.

    Writing the final files directly, instead of ``Dataset.from_file(...).save_to_disk(...)``, avoids a
    second copy that reads every row back through a memory map: those pages count as resident memory,
    so peak RSS would grow with the corpus (~1.2 GB per 150 M tokens).

    With ``path`` the sink writes exactly that one file (one shard of a sharded prep, which names the
    files and writes the metadata itself with :func:`write_split_metadata`); ``close`` then needs no
    fingerprint.
    """

    def __init__(self, split_dir: Path, max_shard_bytes: int = 500 * 1024 * 1024, *, path: Path | None = None) -> None:
        import pyarrow as pa

        self._pa = pa
        self.dir = split_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.schema = row_features().arrow_schema
        self.max_shard_bytes = max_shard_bytes if path is None else float("inf")
        self._path = path
        self._shards: list[Path] = []
        self._writer: Any = None
        self._shard_bytes = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.rows = 0

    def write(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Rows of possibly different lengths, buffered into record batches of ~``_BATCH_ROWS`` rows
        (a batch per row would make the shard's framing outweigh the data)."""
        self._pending.extend(rows)
        self.rows += len(rows)
        if len(self._pending) >= _BATCH_ROWS:
            self._flush_pending()

    def _flush_pending(self) -> None:
        rows, self._pending = self._pending, []
        if not rows:
            return
        lengths = np.fromiter((len(r[0]) for r in rows), dtype=np.int32, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        self._write_flat(offsets, np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]))

    def write_blocks(self, blocks: np.ndarray) -> None:
        """Equal-length rows whose labels equal their inputs (packed pretraining blocks)."""
        n, width = blocks.shape
        if n == 0:
            return
        self._flush_pending()
        self.rows += n
        offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
        flat = blocks.reshape(-1)
        self._write_flat(offsets, flat, flat)

    def _write_flat(self, offsets: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> None:
        pa = self._pa
        if self._writer is None or self._shard_bytes >= self.max_shard_bytes:
            self._next_shard()
        off = pa.array(offsets, type=pa.int32())
        cols = [
            pa.ListArray.from_arrays(off, pa.array(ids, type=pa.int32())),
            pa.ListArray.from_arrays(off, pa.array(labels, type=pa.int32())),
        ]
        batch = pa.record_batch(cols, schema=self.schema)
        self._writer.write_batch(batch)
        self._shard_bytes += batch.nbytes

    def _next_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.dir / f".shard-{len(self._shards):05d}"
        if self._path is not None:
            path = self._path.with_name(f".{self._path.name}.part")
        self._shards.append(path)
        self._writer = self._pa.ipc.new_stream(str(path), self.schema)
        self._shard_bytes = 0

    def close(self, fingerprint: str = "") -> None:
        """Name the shards as ``save_to_disk`` does and write its metadata (``fingerprint`` is the
        datasets cache fingerprint of the split); in one-file mode, move the file into place."""
        self._flush_pending()
        if self._writer is None:
            self._next_shard()  # an empty split still needs a readable (empty) shard
        self._writer.close()
        if self._path is not None:
            self._shards[0].replace(self._path)
            return
        names = [f"data-{i:05d}-of-{len(self._shards):05d}.arrow" for i in range(len(self._shards))]
        for path, name in zip(self._shards, names, strict=True):
            path.rename(self.dir / name)
        write_split_metadata(self.dir, names, fingerprint)


def write_split_metadata(split_dir: Path, names: list[str], fingerprint: str) -> None:
    """The ``state.json`` and ``dataset_info.json`` with which ``load_from_disk`` reads the Arrow files
    ``names`` (in this order) of ``split_dir`` as one split."""
    import json
    from dataclasses import asdict

    from datasets import DatasetInfo

    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (split_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = asdict(DatasetInfo(features=row_features()))
    (split_dir / "dataset_info.json").write_text(
        json.dumps({k: info[k] for k in sorted(info)}, indent=2), encoding="utf-8"
    )


# --------------------------------------------------------------------------------------------- packing
@dataclass
class PackStats:
    """Counts of one split's tokenization; ``padding_fraction`` is padding over all row tokens."""

    examples: int = 0
    tokens: int = 0
    """Real (non-padding) tokens written."""
    rows: int = 0
    padding: int = 0
    dropped_tail_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def padding_fraction(self) -> float:
        total = self.tokens + self.padding
        return self.padding / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "padding_fraction": self.padding_fraction}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PackStats:
        return cls(**{k: v for k, v in doc.items() if k != "padding_fraction"})

    def add(self, other: PackStats) -> None:
        """Add the counts of ``other`` (another shard of the same split)."""
        for name in ("examples", "tokens", "rows", "padding", "dropped_tail_tokens", "truncated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n


def pack_documents(
    encoded: Iterable[np.ndarray], block_size: int, sink: ArrowSink, on_batch: Callable[[], None] | None = None
) -> PackStats:
    """Concatenate EOS-terminated documents and write full ``block_size`` blocks (no padding)."""
    stats = PackStats()
    carry = np.empty(0, dtype=np.int32)
    for flat in encoded:
        stats.tokens += len(flat)
        carry = np.concatenate([carry, flat]) if len(carry) else flat
        n = len(carry) // block_size
        if n:
            sink.write_blocks(carry[: n * block_size].reshape(n, block_size))
            carry = carry[n * block_size :].copy()
        if on_batch:
            on_batch()
    stats.dropped_tail_tokens = len(carry)
    stats.tokens -= len(carry)
    stats.rows = sink.rows
    return stats


def answer_spans(
    render: Callable[[list[dict[str, str]], bool], str], messages: list[dict[str, str]], origin: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant answer in it."""
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        upto = render(messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"{origin}: the tokenizer's chat template does not render conversations "
                "prefix by prefix, so prompt tokens cannot be masked; use a tokenizer with "
                "a prefix-stable chat_template"
            )
        # Trailing whitespace after the answer's end marker belongs to the layout, not the answer.
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def label_tokens(ids: np.ndarray, starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Labels: the token id where the token starts inside an answer span, else -100."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    for s, e in spans:
        inside = (starts >= s) & (starts < e)
        labels[inside] = ids[inside]
    return labels


class InstructPacker:
    """Collects labelled examples into rows.

    Packed (the default): best-fit into at most ``open_blocks`` partly filled blocks, each example into
    the fullest block it still fits; the fullest block is written when a new one must open. Rows are
    exactly ``block_size`` tokens, the rest padding (``pad_id``, label -100). On the built-in
    instruction set this wastes ~3 % on padding where first-fit into one block wastes ~18 %.
    Unpacked: one example per row, longest first within windows of ``window`` examples, so batches of
    neighbouring rows need little padding.
    """

    def __init__(
        self, block_size: int, pad_id: int, sink: ArrowSink, *, pack: bool, window: int, open_blocks: int = 32
    ) -> None:
        self.block_size, self.pad_id, self.sink, self.pack, self.window = block_size, pad_id, sink, pack, window
        self.open_blocks = open_blocks
        self.stats = PackStats()
        self._open: list[tuple[int, list[tuple[np.ndarray, np.ndarray]]]] = []  # (filled, examples)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, ids: np.ndarray, labels: np.ndarray) -> None:
        s = self.stats
        if len(ids) > self.block_size:
            ids, labels = ids[: self.block_size], labels[: self.block_size]
            s.truncated += 1
        if not (labels != IGNORE_INDEX).any():
            s.dropped["answer_beyond_block"] = s.dropped.get("answer_beyond_block", 0) + 1
            return
        s.examples += 1
        s.tokens += len(ids)
        if not self.pack:
            self._pending.append((ids, labels))
            if len(self._pending) >= self.window:
                self._flush_group()
            return
        n = len(ids)
        best = -1
        for i, (filled, _) in enumerate(self._open):
            if filled + n <= self.block_size and (best < 0 or filled > self._open[best][0]):
                best = i
        if best < 0:
            if len(self._open) >= self.open_blocks:
                fullest = max(range(len(self._open)), key=lambda i: self._open[i][0])
                self._write_block(self._open.pop(fullest)[1])
            self._open.append((0, []))
            best = len(self._open) - 1
        filled, items = self._open[best]
        items.append((ids, labels))
        self._open[best] = (filled + n, items)

    def _write_block(self, items: list[tuple[np.ndarray, np.ndarray]]) -> None:
        pad = self.block_size - sum(len(x) for x, _ in items)
        ids = np.concatenate([x for x, _ in items] + [np.full(pad, self.pad_id, dtype=np.int32)])
        labels = np.concatenate([y for _, y in items] + [np.full(pad, IGNORE_INDEX, dtype=np.int32)])
        self.sink.write([(ids, labels)])
        self.stats.padding += pad

    def _flush_group(self) -> None:
        # Longest first within the window: batches of neighbours need little padding.
        group = sorted(self._pending, key=lambda r: -len(r[0]))
        self.sink.write(group)
        # Padding a row up to block_size is the worst case a collator can need: reported, not written.
        self.stats.padding += sum(self.block_size - len(r[0]) for r in group)
        self._pending = []

    def close(self) -> PackStats:
        for _, items in self._open:
            self._write_block(items)
        self._open = []
        if self._pending:
            self._flush_group()
        self.stats.rows = self.sink.rows
        return self.stats
