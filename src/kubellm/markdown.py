"""Markdown for the reports the Kubeflow UI shows (one place that escapes table cells).

Stage reports are small tables; building them from f-strings in every stage left cells with ``|`` or
newlines breaking the table. Every report table goes through :func:`table` or :func:`fields`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def cell(value: Any) -> str:
    """One table cell: ``None`` → ``-``, floats to 6 significant digits, pipes and newlines escaped."""
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:.6g}"
    elif isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value) or "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table with ``headers``; every row as long as the header."""
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fields(values: Mapping[str, Any]) -> str:
    """A two-column table of named values (a stage's results)."""
    return table(["", ""], values.items())


def section(title: str, *parts: str) -> str:
    """``# title`` followed by the non-empty parts, separated by blank lines."""
    return "\n".join([f"# {title}", "", *(p.rstrip("\n") + "\n" for p in parts if p)])
