"""Read ``python -X importtime`` output (or ``PYTHONPROFILEIMPORTTIME=1``): which modules a process
imported. Counted modules, not seconds: a budget in modules holds on any machine, loaded or not."""

from __future__ import annotations

import re

_LINE = re.compile(r"^\s*import time:\s+\d+ \|\s+\d+ \|\s?(\s*)(\S+)\s*$")

#: Packages that cost a task or a command seconds to import: none of them belongs in a start-up path
#: that does not use it.
HEAVY = (
    "torch",
    "transformers",
    "peft",
    "datasets",
    "tokenizers",
    "mlflow",
    "kfp",
    "pandas",
    "pyarrow",
    "scipy",
    "sklearn",
    "numpy",
    "kubernetes",
    "ray",
    "lm_eval",
    "matplotlib",
    "accelerate",
    "sqlalchemy",
)


def modules(text: str) -> list[str]:
    """Every module the process imported, in import order of completion."""
    return [m.group(2) for line in text.splitlines() if (m := _LINE.match(line))]


def heavy(mods: list[str]) -> set[str]:
    """The heavy packages (top-level names) among ``mods``."""
    return {m.split(".")[0] for m in mods} & set(HEAVY)
