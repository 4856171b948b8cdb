"""Reading files: each input file, in its format (JSONL, JSON, CSV, Parquet, text), as ``(origin, record)``.

Files are read as bytes, decompressed when gzip'd (by content, not name), line by line with a size cap
(``max_record_bytes``): one enormous line is refused with a message naming the file and line instead of
exhausting memory, and nothing but the current record is held. ``origin`` names the file and line
(``data/a.jsonl:17``) so any error about a record can point at it. :mod:`kubellm.data.sources` resolves
URIs to :class:`InputFile` objects; :mod:`kubellm.data.records` maps the records to examples.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from kubellm.config.data import SourceConfig
from kubellm.errors import DataError, SourceError

FORMATS = ("jsonl", "json", "csv", "parquet", "txt")
_SUFFIX_FORMAT = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
}
GZIP_MAGIC = b"\x1f\x8b"


Raw = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class InputFile:
    """One file of a source: ``name`` for messages, ``rel`` relative to the source's base (it goes into
    the fingerprint, so moving a corpus elsewhere keeps its fingerprint), ``open`` gives raw bytes."""

    name: str
    rel: str
    open: Callable[[], IO[bytes]] = field(compare=False)


# --------------------------------------------------------------------------------------------- files
def file_format(name: str, fmt: str) -> str:
    """The format of a file: ``fmt`` unless ``auto``, else from its suffix (``.jsonl.gz`` → jsonl)."""
    if fmt != "auto":
        return fmt
    stem = name[:-3] if name.endswith(".gz") else name
    suffix = os.path.splitext(stem)[1].lower()
    if suffix not in _SUFFIX_FORMAT:
        raise DataError(
            f"{name}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
            f"set sources[].format to one of {', '.join(FORMATS)}"
        )
    return _SUFFIX_FORMAT[suffix]


def _open_decompressed(f: InputFile) -> IO[bytes]:
    raw = f.open()
    if f.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    head = raw.read(2)
    if head == GZIP_MAGIC:
        raw.close()
        raise DataError(f"{f.name}: gzip-compressed data in a file not named .gz (rename it to {f.name}.gz)")
    if hasattr(raw, "seek") and raw.seekable():
        raw.seek(0)
        return raw
    return io.BufferedReader(_Prefixed(head, raw))  # type: ignore[arg-type]


class _Prefixed(io.RawIOBase):
    """A non-seekable stream with its first bytes (already read for the gzip check) put back."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._rest.read(len(b))
        b[: len(data)] = data
        return len(data)


def read_file(f: InputFile, fmt: str, cfg: SourceConfig, max_record_bytes: int) -> Iterator[Raw]:
    """Raw records of one file; an empty file or one without records is an error naming the file."""
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet, "txt": _read_txt}
    count = 0
    try:
        with _open_decompressed(f) as fh:
            for item in readers[fmt](f.name, fh, cfg, max_record_bytes):
                count += 1
                yield item
    except (gzip.BadGzipFile, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise SourceError(f"{f.name}: no such file") from None
        raise DataError(f"{f.name}: unreadable ({type(err).__name__}: {err})") from None
    if count == 0:
        raise DataError(f"{f.name}: empty file (no records)")


def _lines(name: str, fh: IO[bytes], limit: int) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each non-blank line, refusing lines over ``limit`` bytes or not UTF-8."""
    lineno = 0
    while True:
        raw = fh.readline(limit + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > limit:
            raise DataError(
                f"{name}:{lineno}: record larger than max_record_bytes ({limit} bytes); split it "
                "or raise data.max_record_bytes"
            )
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{name}:{lineno}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
            ) from None
        yield lineno, text


def _read_jsonl(name: str, fh: IO[bytes], cfg: SourceConfig, limit: int) -> Iterator[Raw]:
    for lineno, line in _lines(name, fh, limit):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{name}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        yield f"{name}:{lineno}", obj


def _read_json(name: str, fh: IO[bytes], cfg: SourceConfig, limit: int) -> Iterator[Raw]:
    # A .json file is parsed whole (JSON has no streaming record boundary): use .jsonl for big corpora.
    data = fh.read()
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not UTF-8 (byte 0x{data[err.start]:02x})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{name}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]} as many exports write it
    if not isinstance(obj, list):
        raise DataError(f"{name}: expected a JSON array of records, got {type(obj).__name__}")
    for i, rec in enumerate(obj):
        yield f"{name}[{i}]", rec


def _read_csv(name: str, fh: IO[bytes], cfg: SourceConfig, limit: int) -> Iterator[Raw]:
    csv.field_size_limit(limit)
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
    reader = csv.DictReader(text)
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{name}:{reader.line_num}: more fields than the header has")
            yield f"{name}:{reader.line_num}", row
    except UnicodeDecodeError:
        raise DataError(f"{name}:{reader.line_num + 1}: not UTF-8") from None
    except csv.Error as err:
        raise DataError(f"{name}:{reader.line_num}: {err} (max_record_bytes is {limit})") from None


def _read_parquet(name: str, fh: IO[bytes], cfg: SourceConfig, limit: int) -> Iterator[Raw]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(fh)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{name}: not a Parquet file ({err})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield f"{name}#{i}", rec
            i += 1


def _read_txt(name: str, fh: IO[bytes], cfg: SourceConfig, limit: int) -> Iterator[Raw]:
    field_name = cfg.text_field
    if cfg.txt_unit == "line":
        for lineno, line in _lines(name, fh, limit):
            if line.strip():
                yield f"{name}:{lineno}", {field_name: line.rstrip("\r\n")}
        return
    if cfg.txt_unit == "document":
        data = fh.read(limit + 1)
        if len(data) > limit:
            raise DataError(f"{name}: document larger than max_record_bytes ({limit} bytes)")
        try:
            yield name, {field_name: data.decode("utf-8-sig")}
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise DataError(f"{name}:{line}: not UTF-8 (byte 0x{data[err.start]:02x})") from None
        return
    para: list[str] = []
    size, start = 0, 1
    for lineno, line in _lines(name, fh, limit):
        if line.strip():
            if not para:
                start = lineno
            para.append(line)
            size += len(line)
            if size > limit:
                raise DataError(f"{name}:{start}: paragraph larger than max_record_bytes ({limit} bytes)")
        elif para:
            yield f"{name}:{start}", {field_name: "".join(para).rstrip("\r\n")}
            para, size = [], 0
    if para:
        yield f"{name}:{start}", {field_name: "".join(para).rstrip("\r\n")}
