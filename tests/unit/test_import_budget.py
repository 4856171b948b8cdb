"""Start-up cost of every CLI command, pinned in imported modules (``python -X importtime``): a command
that only parses its options, prints help or refuses bad input imports none of the heavy libraries
(torch, transformers, mlflow, kfp …) — those load late, in the function that uses them. The KFP
tasks' own budgets are checked on a real local run (tests/pipelines/test_api.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer
from importtime import heavy, modules

from kubellm.cli.app import _register_commands, app

#: Modules a command's start may import (measured: 342 for `kubellm --help`, 440 for a command's help;
#: typer/click/rich and pydantic are most of it).
CLI_BUDGET = 500


def _commands() -> list[str]:
    _register_commands()
    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _imports(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kubellm.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    return proc, modules(proc.stderr)


def test_every_command_is_listed() -> None:
    assert {
        "prep",
        "pretrain",
        "finetune",
        "evaluate",
        "register",
        "deploy",
        "serve",
        "run",
        "compile",
        "submit",
        "schedule",
        "init",
    } <= set(_commands())


@pytest.mark.parametrize("command", [[], *[[c] for c in _commands()]], ids=lambda c: " ".join(c) or "kubellm")
def test_help_imports_no_heavy_library(command: list[str], tmp_path: Path) -> None:
    proc, mods = _imports(*command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert heavy(mods) == set(), f"kubellm {' '.join(command)} --help imports {sorted(heavy(mods))}"
    assert len(mods) <= CLI_BUDGET, f"kubellm {' '.join(command)} --help imports {len(mods)} modules"


@pytest.mark.parametrize(
    "command",
    [
        ["pretrain", "--data", "d", "--out", "o"],
        ["finetune", "--data", "d", "--base", "b", "--out", "o"],
        ["evaluate", "--data", "d", "--model", "m", "--out", "o"],
        ["prep", "--out", "o"],
        ["register", "--model", "m"],
        ["run"],
        ["compile"],
        ["serve"],
        ["deploy"],
        ["playground"],
        ["submit"],
        ["schedule", "--cron", "0 0 3 * * *"],
    ],
    ids=lambda c: c[0],
)
def test_a_bad_config_is_refused_before_any_heavy_import(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("pretrain:\n  loop:\n    max_stepz: 3\n", encoding="utf-8")
    proc, mods = _imports(*command, "--config", "bad.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "pretrain.loop.max_stepz: unknown field" in proc.stderr
    assert heavy(mods) == set(), f"kubellm {command[0]} imports {sorted(heavy(mods))} before refusing its config"
    assert not (tmp_path / "o").exists()
