"""Resolving sources: local files, globs and directories, fsspec URIs, Hub datasets and the built-in corpus.

:func:`resolve` turns a configured URI into a :class:`Source` — the files it names (or a Hub dataset),
failing fast and clearly (:class:`~kubellm.errors.SourceError` names ``data.sources[i].uri``) before any
reading — that streams its raw records in order (:mod:`kubellm.data.readers` reads each file) and
fingerprints its content without a full prep. :mod:`kubellm.data.records` maps the records to examples.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubellm.config.data import DataConfig, SourceConfig
from kubellm.data import builtin
from kubellm.data.readers import FORMATS, InputFile, Raw, file_format, read_file
from kubellm.errors import DataError, SourceError
from kubellm.fsutil import user_path

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


def resolve_all(cfg: DataConfig) -> list[Source]:
    """Every source of ``cfg`` resolved (fails before any reading if one cannot be)."""
    return [resolve(s, i, section_of(cfg.kind)) for i, s in enumerate(cfg.sources)]
