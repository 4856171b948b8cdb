"""`kubellm evaluate --out`: it replaces only earlier evaluation results; a user's folder, the working
directory and a folder inside its model or data are refused in one line, exit 2, before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.cli import main
from kubellm.fsutil import read_marker

BIN = Path(sys.executable).parent
QUICK = [
    "--set",
    "evaluate.num_prompts=0",
    "--set",
    "evaluate.max_batches=1",
    "--set",
    "tracking.enabled=false",
    "--set",
    "evaluate.benchmarks=[]",
]  # the embedded default's benchmark needs a bigger model


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def evaluate_cli(
    base_dir: Path, instruct_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """``kubellm evaluate`` of the tiny base model in this process; returns (exit code, stderr). Unless
    ``work_allowed``, loading a model fails the test: refusing must come first."""
    from kubellm.evaluate import run as evaluate_mod

    monkeypatch.setattr("kubellm.log.setup", lambda *a, **k: None)
    allowed, real = [False], evaluate_mod._models

    def guarded(*a, **k):
        assert allowed[0], "evaluate loaded a model before refusing its output"
        return real(*a, **k)

    monkeypatch.setattr(evaluate_mod, "_models", guarded)

    def run(out: Path | str, *, model: Path = base_dir, work_allowed: bool = False) -> tuple[int, str]:
        allowed[0] = work_allowed
        with pytest.raises(SystemExit) as info:
            main(["evaluate", "--model", str(model), "--data", str(instruct_data), "--out", str(out), *QUICK])
        err = capsys.readouterr().err  # only the CLI's own lines: another test's log handler may add noise
        return int(info.value.code or 0), "\n".join(x for x in err.splitlines() if x.startswith("error: "))

    return run


def test_a_folder_of_user_files_is_refused_and_left_intact(tmp_path: Path, evaluate_cli) -> None:
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "precious.txt").write_text("mine")
    (mine / "sub" / "notes.md").write_text("my notes")
    before = snapshot(mine)
    code, err = evaluate_cli(mine)
    assert code == 2 and err == (
        f"error: {mine}: output directory is not empty and holds no kubellm evaluation "
        "(precious.txt, sub/notes.md); choose an empty or new directory"
    )
    assert snapshot(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_output_inside_the_model_or_the_data_is_refused(
    tmp_path: Path, base_dir: Path, instruct_data: Path, evaluate_cli
) -> None:
    model, data = snapshot(base_dir), snapshot(instruct_data)
    code, err = evaluate_cli(base_dir / "eval")
    assert code == 2 and f"is inside the input {base_dir}" in err
    code, err = evaluate_cli(instruct_data)
    assert code == 2 and f"contains the input {instruct_data}" in err
    assert snapshot(base_dir) == model and snapshot(instruct_data) == data


def test_out_dot_is_refused_in_a_real_process_without_a_traceback(
    tmp_path: Path, base_dir: Path, instruct_data: Path
) -> None:
    """It used to evaluate everything and then crash in the output step."""
    (tmp_path / "precious.txt").write_text("mine")
    proc = subprocess.run(
        [
            str(BIN / "kubellm"),
            "evaluate",
            "--model",
            str(base_dir),
            "--data",
            str(instruct_data),
            "--out",
            ".",
            *QUICK,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: .: is the current directory; an output directory is replaced as a whole: choose a new or empty "
        "directory"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_a_second_evaluation_replaces_the_first(tmp_path: Path, evaluate_cli) -> None:
    out = tmp_path / "eval"
    assert evaluate_cli(out, work_allowed=True)[0] == 0
    assert read_marker(out)["kind"] == "evaluation"
    (out / "metrics.json").write_text('{"stale": true}')  # kubellm's own file, changed: still replaceable
    assert evaluate_cli(out, work_allowed=True)[0] == 0
    assert "metrics" in json.loads((out / "metrics.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
