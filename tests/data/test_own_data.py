"""A user's own data from an empty folder outside the repository: one `kubellm prep` per file, no
config to write, and hints that can be followed as printed."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _kubellm(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "kubellm"), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty folder with a parquet corpus (text in `body`) and a CSV of question,answer pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("mine")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size < 60_000)[:120]
    pq.write_table(
        pa.table(
            {"path": [p.name for p in files], "body": [p.read_text(encoding="utf-8", errors="replace") for p in files]}
        ),
        root / "corpus.parquet",
    )
    with (root / "qa.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        for i in range(300):
            w.writerow([f"Write a function that returns {i} plus x.", f"def add_{i}(x):\n    return x + {i}\n"])
    return root


@pytest.mark.slow
def test_own_parquet_and_csv_need_one_command_each(folder: Path) -> None:
    corpus = _kubellm(
        folder,
        "prep",
        "--source",
        "corpus.parquet",
        "--text-field",
        "body",
        "--out",
        "prepared",
        "--set",
        "data.tokenizer.vocab_size=1024",
    )
    assert corpus.returncode == 0, corpus.stderr[-2000:]
    qa = _kubellm(
        folder,
        "prep",
        "--source",
        "qa.csv",
        "--prompt-field",
        "question",
        "--response-field",
        "answer",
        "--tokenizer",
        "prepared",
        "--out",
        "prepared-qa",
    )
    assert qa.returncode == 0, qa.stderr[-2000:]
    assert json.loads((folder / "prepared" / "manifest.json").read_text())["kind"] == "pretrain"
    manifest = json.loads((folder / "prepared-qa" / "manifest.json").read_text())
    assert manifest["kind"] == "instruct"
    stats = json.loads((folder / "prepared-qa" / "stats.json").read_text())
    assert stats["records_out"] > 250  # the CSV's rows, not the built-in default's


@pytest.mark.slow
def test_a_missing_field_hint_can_be_followed_as_printed(folder: Path) -> None:
    bad = _kubellm(folder, "prep", "--source", "qa.csv", "--section", "instruct_data", "--out", "hinted")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    (line,) = [x for x in bad.stderr.splitlines() if x.startswith("error:")]
    assert "qa.csv" in line and "no field 'prompt'" in line and "(fields: question, answer)" in line
    hint = line.split("--set ")[1].split(" ")[0]  # instruct_data.sources[0].prompt_field=FIELD
    assert hint == "instruct_data.sources[0].prompt_field=FIELD"
    ok = _kubellm(
        folder,
        "prep",
        "--source",
        "qa.csv",
        "--section",
        "instruct_data",
        "--out",
        "hinted",
        "--set",
        hint.replace("FIELD", "question"),
        "--set",
        "instruct_data.sources[0].response_field=answer",
        "--set",
        "instruct_data.tokenizer.vocab_size=300",
    )
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_kubellm_init_writes_a_starter_config_and_never_overwrites(tmp_path: Path) -> None:
    first = _kubellm(tmp_path, "init")
    assert first.returncode == 0, first.stderr
    text = (tmp_path / "kubellm.yaml").read_text()
    assert text.startswith("# kubellm run config") and "builtin://stdlib" in text
    again = _kubellm(tmp_path, "init")
    assert again.returncode == 2 and "never overwrites" in again.stderr
    assert (tmp_path / "kubellm.yaml").read_text() == text
