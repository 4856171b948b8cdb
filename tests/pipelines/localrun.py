"""`kubellm run` as a user runs it, on tiny settings, for the tests of real local pipeline runs.

Every assertion reads what a user reads: the exit code, summary.json and MLflow. Each run costs ~10 task
processes (~5 s of imports each), so each test asks for the fewest runs that prove its point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data.max_docs=40",
    "data.block_size=64",
    "data.tokenizer.vocab_size=512",
    "pretrain.loop.max_steps=6",
    "pretrain.loop.micro_batch_size=4",
    "pretrain.loop.checkpoint_every=3",
    "instruct_data.max_docs=150",
    "instruct_data.block_size=128",
    "finetune.loop.max_steps=4",
    "finetune.loop.micro_batch_size=4",
    "evaluate.num_prompts=2",
    "evaluate.max_new_tokens=4",
    "evaluate.max_batches=2",
    "evaluate.gate.max_perplexity_ratio=1.5",
    "deploy.smoke_max_tokens=2",
    # 4 fine-tuning steps teach no answers (both models answer every prompt with nothing): the default
    # gate rightly refuses that, so the mechanics of the release path are tested with those rules off
    "evaluate.gate.max_empty_answer_rate=null",
    "evaluate.gate.max_generation_drop=null",
    "evaluate.gate.max_benchmark_drop=null",
]


def command(workdir: Path, *args: str) -> list[str]:
    sets = [x for s in TINY for x in ("--set", s)]
    return [
        sys.executable,
        "-m",
        "kubellm.cli",
        "run",
        "--config",
        str(REPO / "configs" / "local.yaml"),
        "--set",
        f"workdir={workdir}",
        *sets,
        *args,
        "--quiet",
    ]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def result(code: int, stdout: str, stderr: str) -> tuple[int, dict | None, str]:
    """Exit code, the summary.json the run printed the path of, and the whole output."""
    paths = re.findall(r"^\s*summary: (.+)$", stdout, flags=re.M)
    return code, json.loads(Path(paths[-1]).read_text()) if paths else None, stdout + stderr


def kubellm_run(workdir: Path, *args: str) -> tuple[int, dict | None, str]:
    """`kubellm run` in a subprocess (as a user runs it); returns exit code, summary.json, output."""
    proc = subprocess.run(command(workdir, *args), capture_output=True, text=True, cwd=workdir, env=ENV, timeout=900)
    return result(proc.returncode, proc.stdout, proc.stderr)


def stage(summary: dict, name: str) -> dict:
    return next(s for s in summary["stages"] if s["stage"] == name)


def make_pretrained_base(out: Path) -> None:
    """A pretrained base model in ``out/model`` as `kubellm prep` + `kubellm pretrain` make it on the tiny
    settings: the ``base_model`` of the fine-tuning pipelines' runs (~15 s, built once per test run)."""
    sets = [x for s in [*TINY, f"workdir={out}"] for x in ("--set", s)]
    config = ["--config", str(REPO / "configs" / "local.yaml")]
    for args in (
        ["prep", "--out", str(out / "prepared")],
        ["pretrain", "--data", str(out / "prepared"), "--out", str(out / "model")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "kubellm.cli", *args, *config, *sets],
            capture_output=True,
            text=True,
            cwd=out,
            env=ENV,
            timeout=300,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
