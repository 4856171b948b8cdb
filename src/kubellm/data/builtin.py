"""The built-in corpus: the Python standard library that ships with every Python, so nothing is downloaded.

``builtin://stdlib`` yields one record per module (``{"text": source}``); ``builtin://stdlib-instruct``
derives instruction pairs from the same files with :mod:`ast`: a function's docstring becomes the
instruction and its code, without the docstring, the response. Both iterate sorted relative paths, so
every machine with the same Python yields the same records in the same order.
"""

from __future__ import annotations

import ast
import inspect
import os
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Directories that are not library source: test suites (~40 % of the stdlib's bytes), third-party
#: packages, bundled wheels, compiled extensions and caches.
SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "lib-dynload",
        "ensurepip",
        "pydoc_data",
        "lib2to3",
        "turtledemo",
    }
)
#: Generated tables rather than code (``pydoc_data/topics.py`` alone is 0.75 MB of one string literal);
#: the largest hand-written module, ``_pydecimal.py``, is 0.23 MB.
MAX_FILE_BYTES = 300_000

BUILTIN_SOURCES = ("stdlib", "stdlib-instruct")


def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every library ``.py`` file under ``root``, sorted by relative POSIX path (deterministic)."""
    root = root or stdlib_root()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune while walking: site-packages alone can hold 10× the stdlib's files.
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        base = Path(dirpath)
        for name in filenames:
            if name.endswith(".py") and (base / name).stat().st_size <= MAX_FILE_BYTES:
                found.append((base / name).relative_to(root).as_posix())
    return [root / rel for rel in sorted(found)]


def iter_stdlib(files: list[Path], root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(origin, {"text": source})`` per module; undecodable files (none in CPython) are skipped."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield f"builtin://stdlib/{path.relative_to(root).as_posix()}", {"text": text}


def iter_stdlib_instruct(files: list[Path], root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(origin, {"prompt", "response"})`` per documented function, in file then source order."""
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(path))
        except (UnicodeDecodeError, OSError, SyntaxError, ValueError):
            continue
        rel = path.relative_to(root).as_posix()
        lines = source.splitlines()
        for qualname, node in _functions(tree):
            pair = function_pair(qualname, node, lines)
            if pair is not None:
                yield f"builtin://stdlib-instruct/{rel}:{node.lineno}", pair


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Module-level functions and methods (one class level deep), in source order."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{sub.name}", sub


def function_pair(
    qualname: str, node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]
) -> dict[str, str] | None:
    """The instruction pair of one function, or ``None`` when it has no docstring or no code besides it."""
    doc = ast.get_docstring(node, clean=False)
    if not doc or len(node.body) < 2:
        return None
    doc_node = node.body[0]
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    if node.end_lineno is None or doc_node.end_lineno is None:
        return None
    # A docstring sharing a line with other code (``def f(): "doc"``) cannot be cut out as whole lines.
    # col offsets count UTF-8 bytes, hence the encode.
    before = lines[doc_node.lineno - 1].encode()[: doc_node.col_offset]
    after = lines[doc_node.end_lineno - 1].encode()[doc_node.end_col_offset or 0 :]
    if doc_node.lineno <= node.lineno or before.strip() or after.strip():
        return None
    kept = lines[first - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
    code = textwrap.dedent("\n".join(kept)).strip("\n")
    prompt = f"Write the Python function `{qualname}`.\n\n{inspect.cleandoc(doc)}"
    return {"prompt": prompt, "response": code}
