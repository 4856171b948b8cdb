"""File-system helpers: outputs that appear complete or not at all, never at the cost of a user's files;
checksums that name the file that changed; I/O failures as one line naming the path and the cause.

Every folder a kubellm command writes (a prepared dataset, evaluation results, a training run, compiled
pipelines) holds a small marker, ``.kubellm-output``, naming its kind and the files kubellm put there.
Before any work, :func:`claim_output` accepts an output folder only if it is missing, empty, or such a
marker of the same kind whose folder holds nothing else; it refuses the current or home directory (or
one containing them) and a folder that contains, or lies inside, an input of the same command. A wrong
``--out`` then costs one error line, not a user's files: before this guard ``prep --out .`` replaced the
working folder, config included.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from kubellm.errors import KubellmError, StorageError

OUTPUT_MARKER = ".kubellm-output"
"""Written into every output folder kubellm makes: ``{"kind": …, "files": [relative paths]}``."""
_SHOWN = 3  # names quoted in an error line


class OutputError(KubellmError):
    """An output path kubellm must not write to (it holds a user's files, or an input of the command)."""


def user_path(path: str | Path) -> Path:
    """A path as a user wrote it, ``~`` and ``~user`` expanded: how every command reads a path (the CLI's
    path options parse through this, and so does every helper here). A quoted ``'~'`` reaches kubellm
    unexpanded by the shell; ``prep --out '~'`` made a folder named ``~`` while the other commands read
    it as the home directory. A pod without a home keeps ``~`` as it is (``Path.expanduser`` raises)."""
    return Path(os.path.expanduser(path))


def resolve_output(path: str | Path, root: str | Path | None = None) -> Path:
    """Resolve an output path, refusing one that escapes ``root`` (``../`` tricks, absolute paths
    outside it). With ``root=None`` any path is accepted."""
    p = user_path(path)
    if root is None:
        return p.resolve()
    root_p = Path(root).resolve()
    full = (root_p / p).resolve()
    if full != root_p and root_p not in full.parents:
        raise KubellmError(f"output path {str(path)!r} escapes its root {str(root_p)!r}")
    return full


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of a kubellm output folder, or ``None`` (absent or unreadable: not ours)."""
    try:
        doc = json.loads((Path(path) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("kind"), str) else None


def mark_output(path: str | Path, kind: str, *, track_files: bool = True) -> None:
    """Mark ``path`` as kubellm's output of ``kind``. With ``track_files`` the marker lists every file
    now in the folder, so a file added later by someone else keeps the folder from being replaced; an
    output written in place over time (a training run) is marked without the list."""
    path = Path(path)
    doc: dict[str, Any] = {"kind": kind}
    if track_files:
        doc["files"] = sorted(_files(path) - {OUTPUT_MARKER})
    write_json_atomic(path / OUTPUT_MARKER, doc)
    os.chmod(path / OUTPUT_MARKER, 0o644)  # others sharing the volume must be able to recognise it


def claim_output(path: str | Path, kind: str, *, inputs: Iterable[str | Path] = (), legacy: Iterable[str] = ()) -> Path:
    """Check that ``path`` may receive an output of ``kind`` (replacing what is there); return it
    absolute. Call it before any work: it raises :class:`OutputError` with one line naming the path and
    the reason. ``inputs`` are the command's input files and folders; ``legacy`` names files (relative
    to ``path``) that identify an output of ``kind`` written before markers existed."""
    out = Path(os.path.abspath(user_path(path)))
    real = out.resolve()
    for what, special in _special_dirs():
        if real == special or real in special.parents:
            raise OutputError(
                f"{path}: is {what}{'' if real == special else ' or contains it'}; an output "
                "directory is replaced as a whole: choose a new or empty directory"
            )
    _check_inputs(path, real, inputs)
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise OutputError(f"{path}: output path exists and is not a directory")
    _check_contents(path, out, kind, legacy)
    return out


def _special_dirs() -> Iterator[tuple[str, Path]]:
    """The current and home directories, where they exist (a pod running as an arbitrary user may have
    neither a HOME nor a passwd entry)."""
    for what, where in (("the current directory", Path.cwd), ("your home directory", Path.home)):
        try:
            yield what, where().resolve()
        except (OSError, RuntimeError):
            continue


def _check_inputs(shown: str | Path, real: Path, inputs: Iterable[str | Path]) -> None:
    for item in inputs:
        inp = user_path(item)
        if not inp.exists():
            continue  # a Hub id, a remote URI: nothing on this disk to overwrite
        inp = inp.resolve()
        if real == inp or real in inp.parents:
            raise OutputError(f"{shown}: contains the input {item} of this command; choose another output directory")
        if inp.is_dir() and inp in real.parents:
            raise OutputError(
                f"{shown}: is inside the input {item} of this command; choose an output directory outside it"
            )


def _check_contents(shown: str | Path, out: Path, kind: str, legacy: Iterable[str]) -> None:
    present = _files(out)
    if not present and not any(out.iterdir()):
        return
    marker = read_marker(out)
    if marker is None:
        if any((out / name).is_file() for name in legacy):
            return
        raise OutputError(
            f"{shown}: output directory is not empty and holds no kubellm {_words(kind)} "
            f"({_some(present or {p.name for p in out.iterdir()})}); choose an empty or new "
            "directory"
        )
    if marker["kind"] != kind:
        raise OutputError(
            f"{shown}: holds kubellm output of another kind ({_words(marker['kind'])}, not "
            f"{_words(kind)}); choose another output directory"
        )
    if isinstance(marker.get("files"), list):
        foreign = present - set(marker["files"]) - {OUTPUT_MARKER}
        if foreign:
            raise OutputError(
                f"{shown}: holds files kubellm did not write ({_some(foreign)}); move them or "
                "choose another output directory"
            )


def _files(root: Path) -> set[str]:
    """Every file under ``root`` (symlinks included, not followed), relative, '/'-separated."""
    if not root.is_dir():
        return set()
    found = set()
    for base, dirs, names in os.walk(root):
        rel = Path(base).relative_to(root)
        found.update((rel / n).as_posix() for n in names)
        found.update((rel / d).as_posix() for d in dirs if Path(base, d).is_symlink())
    return found


def _some(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _words(kind: str) -> str:
    return kind.replace("-", " ")


@contextlib.contextmanager
def atomic_dir(final: str | Path, kind: str = "output", *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``final`` and move it into place, marked as ``kind``, only
    when the block succeeds. On any exception the temporary directory is removed and ``final`` is
    untouched, so a directory at ``final`` is always complete. An existing ``final`` is replaced only
    when :func:`claim_output` allows it (checked again here: the caller checked before its work)."""
    final = Path(os.path.abspath(user_path(final)))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        install_dir(tmp, final, kind, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install_dir(tmp: Path, final: Path, kind: str, *, overwrite: bool = True) -> None:
    """Mark the finished directory ``tmp`` as ``kind`` and move it to ``final`` (beside it), replacing
    what is there only when :func:`claim_output` allows it."""
    mark_output(tmp, kind)
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise KubellmError(f"{final}: already exists")
        claim_output(final, kind)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def fsync_tree(path: str | Path) -> None:
    """Flush every file under ``path``, then the directories themselves, to stable storage: a marker
    written after this names only data that survives a power cut or a node crash."""
    path = Path(path)
    dirs = [path]
    for base, subdirs, names in os.walk(path):
        dirs.extend(Path(base, d) for d in subdirs)
        for name in names:
            fsync_path(Path(base, name))
    for d in reversed(dirs):
        fsync_path(d)


def fsync_path(path: str | Path) -> None:
    """``fsync`` one file or directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file and ``os.replace`` so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------- checksums
# xxHash3-128 where the ``xxhash`` module is installed (a ``datasets`` dependency; 19 GB/s on one core
# here, against 1.0 GB/s for SHA-256), SHA-256 otherwise; they detect damage, not tampering.
def _hasher() -> tuple[str, Callable[[], Any]]:
    try:
        import xxhash
    except ImportError:
        return "sha256", hashlib.sha256
    return "xxh3_128", xxhash.xxh3_128


def _digest(path: Path, make: Callable[[], Any]) -> str:
    h = make()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def checksum_record(path: Path) -> dict[str, Any]:
    """Size and checksum of one file, as :func:`write_checksums` records them."""
    return {"bytes": path.stat().st_size, "digest": _digest(path, _hasher()[1])}


def write_checksums(
    root: Path, files: Iterable[str], dest: Path, recorded: dict[str, dict[str, Any]] | None = None
) -> None:
    """Record size and checksum of each of ``files`` (relative to ``root``, '/'-separated) in ``dest``;
    ``recorded`` adds records made elsewhere (by other processes, with :func:`checksum_record`)."""
    algorithm, make = _hasher()
    records = {
        name: {"bytes": (root / name).stat().st_size, "digest": _digest(root / name, make)} for name in sorted(files)
    }
    records.update(recorded or {})
    dest.write_text(json.dumps({"algorithm": algorithm, "files": records}, indent=1), encoding="utf-8")


def verify_checksums(
    root: Path,
    checksums: Path,
    error: type[KubellmError],
    *,
    required: Iterable[str] = (),
    prefix: str = "",
    what: str = "checkpoint",
    when: str = "written",
    part: tuple[int, int] = (0, 1),
) -> bool:
    """Compare the files recorded in ``checksums`` (those whose name starts with ``prefix``) with their
    size and checksum. True: all match; False: nothing to compare with (no such file, or a hash this
    machine lacks); raises ``error`` naming the first file that differs ("the bytes changed after the
    ``what`` was ``when``"). ``part=(i, n)`` reads only every n-th file from the i-th (n processes share
    the reading; every one of them checks that each file is present and of its size)."""
    try:
        doc = json.loads(checksums.read_text(encoding="utf-8"))
        algorithm = doc["algorithm"]
        files = {name: (int(rec["bytes"]), str(rec["digest"])) for name, rec in doc["files"].items()}
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise error(f"{checksums}: unreadable ({type(err).__name__})") from None
    name, make = _hasher()
    if algorithm not in (name, "sha256"):
        return False
    make = make if algorithm == name else hashlib.sha256
    for fname in required:
        if fname not in files:
            raise error(f"{checksums}: records no checksum for {fname}")
    mine = sorted((name, rec) for name, rec in files.items() if name.startswith(prefix))
    for i, (fname, (size, digest)) in enumerate(mine):
        p = root / fname
        if not p.is_file():
            raise error(f"{p}: missing")
        if p.stat().st_size != size:
            raise error(f"{p}: {p.stat().st_size} bytes, {size} when {when} (truncated or overwritten)")
        if i % part[1] == part[0] and _digest(p, make) != digest:
            raise error(f"{p}: checksum mismatch (the bytes changed after the {what} was {when})")
    return True


# ------------------------------------------------------------------------------------------- I/O failures
# What a user can do something about, by errno, in the words of the line they read.
_IO_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (over this process's file-size limit, ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (a failing disk or volume)",
}
_FULL_BYTES = 1 << 20  # a volume with less than this free is full for any file worth writing


def io_cause(err: BaseException, where: str | Path) -> str | None:
    """Why an operation under ``where`` failed, in words, when it is an I/O failure a user can act on;
    ``None`` otherwise (a bug keeps its traceback).

    The errno of an ``OSError`` in the exception's chain first; then the system's own words inside the
    message (safetensors and torch's zip writer report the ``OSError`` as text); then the volume itself:
    torch's zip writer reports a full disk only as ``unexpected pos``, so a volume found (nearly) full
    after a failed write is the cause.
    """
    chain, seen = [], err
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in _IO_CAUSES:
            return _IO_CAUSES[e.errno]
    text = " ".join(str(e) for e in chain)
    for code, words in _IO_CAUSES.items():
        if os.strerror(code) in text:
            return words
    if not isinstance(err, OSError | RuntimeError):
        return None
    with contextlib.suppress(OSError):
        stat = os.statvfs(where)
        if stat.f_bavail * stat.f_frsize < _FULL_BYTES:
            return _IO_CAUSES[errno.ENOSPC]
    return None


@contextlib.contextmanager
def io_errors(path: str | Path, doing: str, then: str = "") -> Iterator[None]:
    """Turn an I/O failure a user can act on (:func:`io_cause`) inside the block into one line:
    ``<path>: <doing>: <cause><then>`` (:class:`StorageError`, exit 2). Errors of kubellm pass as they
    are, and so does anything else (a bug keeps its traceback)."""
    try:
        yield
    except KubellmError:
        raise
    except Exception as err:
        where = Path(path)
        cause = io_cause(err, where if where.exists() else where.parent)
        if cause is None:
            raise
        raise StorageError(f"{path}: {doing}: {cause}{then}") from None
