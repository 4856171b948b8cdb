"""Reading sources: local files, globs and directories, fsspec URIs, Hub datasets and the built-in corpus.

Every source becomes a stream of ``(origin, record)`` pairs, where ``origin`` names the file and line
(``data/a.jsonl:17``) so any error about a record can point at it, and ``record`` is the raw dict. Files
are read as bytes line by line with a size cap (``max_record_bytes``), so one enormous line is refused
with a message instead of exhausting memory, and nothing but the current record is held in memory.

:func:`iter_examples` maps raw records to what a stage trains on: a text (pretraining) or a list of chat
messages (instruction data). Malformed input raises :class:`~kubellm.errors.DataError` naming the file
and line; unreachable sources raise :class:`~kubellm.errors.SourceError`.
"""

from __future__ import annotations

import csv
import glob
import gzip
import importlib.util
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubellm.config.data import DataConfig, SourceConfig
from kubellm.data import builtin
from kubellm.errors import DataError, SourceError
from kubellm.fsutil import user_path

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
#: fsspec protocols and the package each one needs (named in the error when it is missing).
FSSPEC_BACKENDS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "hf": "huggingface_hub",
}
ROLES = ("system", "user", "assistant")

Raw = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class InputFile:
    """One file of a source: ``name`` for messages, ``rel`` relative to the source's base (it goes into
    the fingerprint, so moving a corpus elsewhere keeps its fingerprint), ``open`` gives raw bytes."""

    name: str
    rel: str
    open: Callable[[], IO[bytes]] = field(compare=False)


# --------------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """A resolved source: what to read, and how to fingerprint it without a full prep."""

    cfg: SourceConfig
    where: str
    """``data.sources[i]``, for messages about the config."""
    kind: str
    """``builtin``, ``files`` or ``hub``."""
    files: list[InputFile] = field(default_factory=list)
    builtin_root: Path | None = None

    def records(self, max_record_bytes: int, on_file: Callable[[], None] | None = None) -> Iterator[Raw]:
        """Raw records in order; ``on_file`` is called after each file (progress)."""
        for f in self.units():
            yield from self.file_records(f, max_record_bytes)
            if on_file:
                on_file()

    def units(self) -> list[InputFile | None]:
        """What can be read independently, in order: each file, or the whole Hub dataset (``None``)."""
        return [None] if self.kind == "hub" else list(self.files)

    def file_records(self, f: InputFile | None, max_record_bytes: int) -> Iterator[Raw]:
        """Raw records of one unit of :meth:`units`."""
        if f is None:
            yield from _hub_records(self.cfg)
        elif self.kind == "builtin":
            read = builtin.iter_stdlib if self.cfg.uri == "builtin://stdlib" else builtin.iter_stdlib_instruct
            yield from read([self.builtin_root / f.rel], self.builtin_root)  # type: ignore[operator,arg-type]
        else:
            yield from read_file(f, file_format(f.name, self.cfg.format), self.cfg, max_record_bytes)

    def fingerprint(self, h: Any) -> None:
        """Feed this source's identity and content into the hash ``h`` (streaming, 1 MiB at a time)."""
        h.update(f"{self.kind}\0{self.cfg.model_dump_json(exclude={'uri'})}\0".encode())
        if self.kind == "hub":
            h.update(f"{self.cfg.uri}\0{_hub_revision_sha(self.cfg)}\0".encode())
            return
        if self.kind == "builtin":
            h.update(f"{self.cfg.uri}\0".encode())
        for f in self.files:
            h.update(f"{f.rel}\0".encode())
            with f.open() as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
            h.update(b"\0")


def section_of(kind: str) -> str:
    """The run-config section a data config of ``kind`` lives in (what hints and ``--set`` name)."""
    return "data" if kind == "pretrain" else "instruct_data"


def resolve(cfg: SourceConfig, index: int, section: str = "data") -> Source:
    """Resolve a source URI to the files it names (or a Hub dataset), failing fast and clearly.
    ``section`` names the config section in messages (``instruct_data.sources[0].uri``)."""
    where = f"{section}.sources[{index}]"
    uri = cfg.uri.strip()
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return Source(cfg, where, "files", _local_files(uri, cfg, where))
    scheme = scheme.lower()
    if scheme == "builtin":
        if rest not in builtin.BUILTIN_SOURCES:
            names = ", ".join(f"builtin://{n}" for n in builtin.BUILTIN_SOURCES)
            raise SourceError(f"{where}.uri {uri!r}: unknown built-in source (expected {names})")
        root = builtin.stdlib_root()
        files = [InputFile(str(p), p.relative_to(root).as_posix(), _opener(p)) for p in builtin.stdlib_files(root)]
        return Source(cfg, where, "builtin", files, builtin_root=root)
    if scheme == "hf":
        if rest.count("/") > 1 or not rest.strip("/"):
            raise SourceError(f"{where}.uri {uri!r}: expected hf://owner/name")
        return Source(cfg, where, "hub")
    if scheme == "file":
        return Source(cfg, where, "files", _local_files(rest, cfg, where))
    return Source(cfg, where, "files", _fsspec_files(uri, scheme, cfg, where))


def _opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: open(path, "rb")  # noqa: SIM115 - the caller closes it


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _readable(name: str, fmt: str) -> bool:
    try:
        file_format(name, fmt)
    except DataError:
        return False
    return True


def _local_files(spec: str, cfg: SourceConfig, where: str) -> list[InputFile]:
    path = user_path(spec)
    if _has_magic(spec):
        base = Path(*[p for p in path.parts[: next(i for i, p in enumerate(path.parts) if _has_magic(p))]])
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            raise SourceError(f"{where}.uri {spec!r}: the pattern matches no files")
    elif path.is_dir():
        base = path
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and _readable(p.name, cfg.format)
        )
        if not files:
            raise SourceError(f"{where}.uri {spec!r}: the directory holds no {'/'.join(FORMATS)} files")
    elif path.is_file():
        base, files = path.parent, [path]
    else:
        raise SourceError(f"{where}.uri {spec!r}: no such file or directory")
    return [
        InputFile(str(p), p.relative_to(base).as_posix() if base.parts else p.as_posix(), _opener(p)) for p in files
    ]


def _fsspec_files(uri: str, scheme: str, cfg: SourceConfig, where: str) -> list[InputFile]:
    from fsspec.registry import known_implementations

    impl = known_implementations.get(scheme)
    if impl is None and scheme not in FSSPEC_BACKENDS:
        raise SourceError(
            f"{where}.uri {uri!r}: unknown URI scheme {scheme!r} (expected a local path, "
            "builtin://, hf://, or an fsspec URI such as s3://, gs://, https://)"
        )
    package = FSSPEC_BACKENDS.get(scheme) or (impl or {}).get("class", "").split(".")[0]
    if package and importlib.util.find_spec(package) is None:
        raise SourceError(
            f"{where}.uri {uri!r}: reading {scheme}:// needs the {package!r} package (pip install {package})"
        )
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if _has_magic(path):
            names = sorted(fs.glob(path))
            base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        elif fs.isdir(path):
            names = sorted(n for n in fs.find(path) if _readable(n, cfg.format))
            base = path
        else:
            names, base = [path], path.rsplit("/", 1)[0]
    except (OSError, ValueError, ImportError) as err:
        raise SourceError(f"{where}.uri {uri!r}: cannot list it ({type(err).__name__}: {err})") from None
    if not names:
        raise SourceError(f"{where}.uri {uri!r}: matches no files")
    proto = scheme + "://"

    def opener(n: str) -> Callable[[], IO[bytes]]:
        return lambda: fs.open(n, "rb")

    return [
        InputFile(proto + n.removeprefix(proto), n[len(base) :].lstrip("/") or n.rsplit("/", 1)[-1], opener(n))
        for n in names
    ]


def _hub_check(cfg: SourceConfig) -> str:
    """Fail fast when the Hub cannot be reached; returns ``owner/name``."""
    repo = cfg.uri.split("://", 1)[1].strip("/")
    # Read at call time, not import time: the user may export it after kubellm is imported.
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise SourceError(
            f"{cfg.uri}: the Hugging Face Hub is offline (HF_HUB_OFFLINE=1); unset it where the "
            "network allows, or use a local file or builtin://stdlib"
        )
    return repo


def _hub_revision_sha(cfg: SourceConfig) -> str:
    repo = _hub_check(cfg)
    from huggingface_hub import HfApi

    try:
        # 10 s: a machine without network must fail within seconds, not after minutes of retries.
        return HfApi().dataset_info(repo, revision=cfg.hub_revision, timeout=10).sha or ""
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot reach this dataset"
        raise SourceError(
            f"{cfg.uri}: cannot reach the Hub dataset ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def _hub_records(cfg: SourceConfig) -> Iterator[Raw]:
    _hub_revision_sha(cfg)  # fails fast when offline
    from datasets import load_dataset

    repo = cfg.uri.split("://", 1)[1].strip("/")
    try:
        ds = load_dataset(repo, split=cfg.hub_split, revision=cfg.hub_revision, streaming=True)
    except Exception as err:  # noqa: BLE001
        raise SourceError(f"{cfg.uri}: cannot load split {cfg.hub_split!r} ({type(err).__name__}: {err})") from None
    for i, row in enumerate(ds):
        yield f"{cfg.uri}[{cfg.hub_split}]#{i}", row


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


# --------------------------------------------------------------------------------------------- mapping
def _field(rec: dict[str, Any], name: str, origin: str, where: str, setting: str) -> str:
    if name not in rec:
        fields = ", ".join(map(str, list(rec)[:8])) or "none"
        raise DataError(
            f"{origin}: no field {name!r} (fields: {fields}); name the right one with "
            f"--set {where}.{setting}=FIELD (or `kubellm prep --{setting.replace('_', '-')} FIELD`)"
        )
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {name!r} is {type(value).__name__}, expected text")
    return value


#: The column a record of chat messages is found in without ``messages_field`` (as TRL detects it).
CHAT_FIELD = "messages"


def _messages(value: Any, origin: str, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{origin}: field {name!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{origin}: {name}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{origin}: {name}[{i}] has role {m['role']!r}, expected one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{origin}: {name} must end with an assistant message (the answer to learn)")
    if len(out) < 2 or out[-2]["role"] != "user":
        raise DataError(f"{origin}: {name}: the final assistant message must follow a user message")
    return out


def to_example(rec: Any, src: Source, kind: str, origin: str) -> str | list[dict[str, str]]:
    """One raw record mapped to a text (pretraining) or chat messages (instruction data)."""
    if not isinstance(rec, dict):
        raise DataError(f"{origin}: expected an object (a record with fields), got {type(rec).__name__}")
    c = src.cfg
    if kind == "pretrain":
        return _field(rec, c.text_field, origin, src.where, "text_field")
    if c.messages_field is not None:
        if c.messages_field not in rec:
            fields = ", ".join(map(str, list(rec)[:8])) or "none"
            raise DataError(
                f"{origin}: no field {c.messages_field!r} (fields: {fields}); name the right one "
                f"with --set {src.where}.messages_field=FIELD (or `kubellm prep --messages-field FIELD`)"
            )
        return _messages(rec[c.messages_field], origin, c.messages_field)
    if c.prompt_field not in rec and isinstance(rec.get(CHAT_FIELD), list):
        # A conversational record (TRL's convention: a ``messages`` column) needs no setting.
        return _messages(rec[CHAT_FIELD], origin, CHAT_FIELD)
    prompt = _field(rec, c.prompt_field, origin, src.where, "prompt_field")
    response = _field(rec, c.response_field, origin, src.where, "response_field")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def resolve_all(cfg: DataConfig) -> list[Source]:
    """Every source of ``cfg`` resolved (fails before any reading if one cannot be)."""
    return [resolve(s, i, section_of(cfg.kind)) for i, s in enumerate(cfg.sources)]


def iter_examples(
    cfg: DataConfig,
    sources: list[Source],
    on_file: Callable[[], None] | None = None,
) -> Iterator[tuple[str, str | list[dict[str, str]], int]]:
    """``(origin, example, source index)`` over all sources in order, honouring ``max_records`` and
    ``max_docs``."""
    total = 0
    for index, src in enumerate(sources):
        for n, (origin, rec) in enumerate(src.records(cfg.max_record_bytes, on_file)):
            if cfg.max_docs is not None and total >= cfg.max_docs:
                return
            if src.cfg.max_records is not None and n >= src.cfg.max_records:
                break
            total += 1
            yield origin, checked_example(cfg, rec, src, origin), index


def checked_example(cfg: DataConfig, rec: Any, src: Source, origin: str) -> str | list[dict[str, str]]:
    """:func:`to_example`, refusing an example larger than ``max_record_bytes``."""
    example = to_example(rec, src, cfg.kind, origin)
    size = len(example) if isinstance(example, str) else sum(len(m["content"]) for m in example)
    # Characters are at most 4 UTF-8 bytes: only encode when the cheap bound is inconclusive.
    if size * 4 > cfg.max_record_bytes and _nbytes(example) > cfg.max_record_bytes:
        raise DataError(f"{origin}: record larger than max_record_bytes ({cfg.max_record_bytes} bytes)")
    return example


def _nbytes(example: str | list[dict[str, str]]) -> int:
    if isinstance(example, str):
        return len(example.encode())
    return sum(len(m["content"].encode()) for m in example)
