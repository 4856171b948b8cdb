"""Write the example's own data into a folder, as a team's own files would be: a parquet corpus whose
text is in a column named ``body``, and a CSV of ``question,answer`` pairs — neither uses kubellm's
default column names. Built from the Python standard library and templates: nothing to download.

    python examples/own_data/make_data.py mydata     # → mydata/corpus.parquet, mydata/qa.csv
"""

from __future__ import annotations

import csv
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

#: Question → answer templates; ``{n}`` and ``{w}`` vary per row.
TEMPLATES = [
    ("Write a function add_{n} that returns x plus {n}.", "def add_{n}(x):\n    return x + {n}\n"),
    ("Write a function times_{n} that multiplies x by {n}.", "def times_{n}(x):\n    return x * {n}\n"),
    (
        "Write a function that tells whether x is divisible by {n}.",
        "def divisible_by_{n}(x):\n    return x % {n} == 0\n",
    ),
    ("Write a function that repeats the string s {n} times.", "def repeat_{n}(s):\n    return s * {n}\n"),
    ("Write a function that returns the first {n} items of a list.", "def first_{n}(items):\n    return items[:{n}]\n"),
    (
        "Write a function that counts how often {w!r} occurs in a text.",
        "def count_{w}(text):\n    return text.count({w!r})\n",
    ),
    (
        "Write a function that tells whether a string starts with {w!r}.",
        "def starts_with_{w}(s):\n    return s.startswith({w!r})\n",
    ),
    (
        "Write a function that returns the numbers below {n} that are even.",
        "def evens_below_{n}():\n    return [i for i in range({n}) if i % 2 == 0]\n",
    ),
]
WORDS = ["data", "model", "token", "batch", "layer", "queue", "node", "pod", "run", "step"]


def write(folder: Path, *, modules: int = 120, pairs_per_template: int = 40) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size < 60_000)[:modules]
    corpus = folder / "corpus.parquet"
    pq.write_table(
        pa.table(
            {"path": [p.name for p in files], "body": [p.read_text(encoding="utf-8", errors="replace") for p in files]}
        ),
        corpus,
    )
    qa = folder / "qa.csv"
    with qa.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["question", "answer"])
        for i in range(pairs_per_template):
            for question, answer in TEMPLATES:
                n, w = i + 2, WORDS[i % len(WORDS)]
                out.writerow([question.format(n=n, w=w), answer.format(n=n, w=w)])
    return corpus, qa


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python make_data.py FOLDER")
    for path in write(Path(sys.argv[1])):
        print(path)
