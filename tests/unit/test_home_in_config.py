"""`~` in a config value means the home directory for every command, as in a path flag (issue 24)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kubellm.config.tracking import TrackingConfig
from kubellm.stages import StageContext

BIN = Path(sys.executable).parent


def test_workdir_with_a_tilde_is_the_home_directory_in_every_stage(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    ctx = StageContext.for_command(TrackingConfig(enabled=False), "~/kubellm-work")
    assert ctx.workdir == str(tmp_path / "kubellm-work")
    assert StageContext.from_param(TrackingConfig(enabled=False).model_dump(), "~/w").workdir == str(tmp_path / "w")


def test_prep_reads_sources_and_tokenizer_under_the_home_directory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "corpus").mkdir(parents=True)
    words = [f"w{a}{b}" for a in "abcdefghij" for b in "klmnopqrst"]
    (home / "corpus" / "a.jsonl").write_text(
        "".join(
            f'{{"text": "{" ".join(words[(i * 7 + j) % 100] for j in range(40))} number {i}"}}\n' for i in range(200)
        )
    )
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [
            str(BIN / "kubellm"),
            "prep",
            "--source",
            "~/corpus/a.jsonl",
            "--out",
            "~/prepared",
            "--set",
            "data.tokenizer.vocab_size=300",
            "--set",
            "data.block_size=16",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (home / "prepared" / "tokenizer").is_dir() and not (tmp_path / "~").exists()
    again = subprocess.run(
        [
            str(BIN / "kubellm"),
            "prep",
            "--source",
            "~/corpus/a.jsonl",
            "--out",
            "~/second",
            "--set",
            "data.tokenizer.path=~/prepared",
            "--set",
            "data.block_size=16",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert (home / "second").is_dir() and not (tmp_path / "~").exists()
