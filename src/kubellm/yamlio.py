"""YAML documents read with libyaml's C parser where PyYAML has it (it does in every wheel on PyPI).

Compiled pipelines are ~100 KB each and CRDs up to 2 MB: PyYAML's pure-Python parser takes ~0.4 s per
compiled pipeline and ~6 s per large CRD, the C parser a tenth of that, with the same safe types and the
same ``problem_mark`` on errors. Small hand-written files (run configs) keep ``yaml.safe_load``.
"""

from __future__ import annotations

from typing import IO, Any

import yaml

LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(stream: str | bytes | IO[str]) -> Any:
    """One document, as ``yaml.safe_load``."""
    return yaml.load(stream, Loader=LOADER)  # noqa: S506 (a safe loader: SafeLoader or its C twin)


def load_all(stream: str | bytes | IO[str]) -> list[Any]:
    """Every document, as ``list(yaml.safe_load_all(...))``."""
    return list(yaml.load_all(stream, Loader=LOADER))  # noqa: S506
