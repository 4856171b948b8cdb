"""`kubellm evaluate`, `register` and `promote` from the command line (in-process, real sqlite store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubellm.cli import main


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


@pytest.mark.slow
def test_evaluate_register_promote(
    base_dir: Path,
    instruct_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # the default workdir .kubellm lands here
    out = tmp_path / "eval"
    # no base model: the default ratio rule is not evaluable, so the gate fails, and the exit code is 0
    code = _run(
        [
            "evaluate",
            "--model",
            str(base_dir),
            "--data",
            str(instruct_data),
            "--out",
            str(out),
            "--set",
            "evaluate.num_prompts=2",
            "--set",
            "evaluate.max_new_tokens=4",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "gate: FAILED" in printed and "max_perplexity_ratio: not evaluable" in printed
    assert json.loads((out / "metrics.json").read_text())["passed"] is False

    assert _run(["register", "--model", str(base_dir)]) == 0
    assert "candidate" in capsys.readouterr().out
    assert _run(["promote", "--version", "1"]) == 0
    assert "champion" in capsys.readouterr().out
    assert (tmp_path / ".kubellm" / "mlflow.db").is_file()

    assert _run(["promote", "--version", "9"]) == 2
    assert capsys.readouterr().err.startswith("error: MLflow at sqlite:")
