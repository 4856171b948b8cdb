"""File-system helpers: outputs that appear complete or not at all, and safe output paths."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubellm.errors import KubellmError


def resolve_output(path: str | Path, root: str | Path | None = None) -> Path:
    """Resolve an output path, refusing one that escapes ``root`` (``../`` tricks, absolute paths
    outside it). With ``root=None`` any path is accepted."""
    p = Path(path)
    if root is None:
        return p.resolve()
    root_p = Path(root).resolve()
    full = (root_p / p).resolve()
    if full != root_p and root_p not in full.parents:
        raise KubellmError(f"output path {str(path)!r} escapes its root {str(root_p)!r}")
    return full


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``final`` and move it into place only when the block
    succeeds. On any exception the temporary directory is removed and ``final`` is untouched, so a
    directory at ``final`` is always complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise KubellmError(f"{final}: already exists")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
