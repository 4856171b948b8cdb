"""The suite's own guard rails, run for real on a throw-away test tree: a hung test fails alone at its
time limit and the run goes on; a ``serial`` test runs while no other test does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETTINGS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def _inner_suite(root: Path, files: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """pytest on ``files`` with the repository's conftest and settings (the timeout shortened by -o)."""
    (root / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    markers = "\n".join(f"    {m}" for m in SETTINGS["markers"])
    (root / "pytest.ini").write_text(f"[pytest]\nmarkers =\n{markers}\ntimeout = {SETTINGS['timeout']}\n")
    for name, body in files.items():
        (root / name).write_text(textwrap.dedent(body))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(root),
            "--basetemp",
            str(root / "tmp"),
            *args,
            str(root),
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=100,
    )


def test_every_test_has_a_time_limit_of_minutes_not_ci_s_hour() -> None:
    assert 30 <= int(SETTINGS["timeout"]) <= 300


@pytest.mark.slow
def test_a_hung_test_fails_alone_at_its_limit_and_the_run_goes_on(tmp_path: Path) -> None:
    out = _inner_suite(
        tmp_path,
        {
            "test_hang.py": """
            import time

            def test_sleeps_forever():
                time.sleep(10_000)

            def test_after_the_hang():
                assert True
        """,
            "test_other.py": """
            def test_elsewhere():
                assert True
        """,
        },
        "-n",
        "2",
        "-o",
        "timeout=3",
    )
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "1 failed, 2 passed" in text, text
    assert "Timeout (>3.0s)" in text and "test_sleeps_forever" in text, text


@pytest.mark.slow
def test_a_serial_test_runs_while_no_other_test_does(tmp_path: Path) -> None:
    """Each test appends its start and end to one log; a serial test's span must hold no other event."""
    log = tmp_path / "events.log"
    body = f"""
        import os, time
        import pytest

        def _span(name, seconds):
            with open({str(log)!r}, "a") as f:
                f.write(f"start {{name}}\\n")
            time.sleep(seconds)
            with open({str(log)!r}, "a") as f:
                f.write(f"end {{name}}\\n")
    """

    def tests(name: str, count: int, seconds: float) -> str:
        return "".join(
            f"\n        def test_{name}_{i}():\n            _span('{name}{i}', {seconds})\n" for i in range(count)
        )

    serial = "\n        @pytest.mark.serial\n        def test_alone():\n            _span('serial', 1.0)\n"
    # A module's tests run on one worker: the short module ends first, its worker takes the serial test
    # while the other is in the middle of the long module.
    out = _inner_suite(
        tmp_path,
        {
            "test_a.py": body + tests("short", 2, 0.1),
            "test_b.py": body + tests("long", 5, 0.6),
            "test_serial.py": body + serial,
        },
        "-n",
        "2",
        "--dist",
        "loadscope",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    events = log.read_text().split()
    lines = [f"{events[i]} {events[i + 1]}" for i in range(0, len(events), 2)]
    start, end = lines.index("start serial"), lines.index("end serial")
    assert end == start + 1, lines  # nothing started or ended while the serial test ran
    assert len(lines) == 16 and lines.index("start long4") > start  # the long module was still running
