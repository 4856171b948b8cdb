"""The LoRA sweep pipeline on KFP's local runner: several fine-tunes, the best one registered."""

from __future__ import annotations

import pytest
from localrun import kubellm_run, make_pretrained_base

# Two trials of fine-tune + evaluate, then register and deploy: ~2 minutes idle, 3x that beside a CPU hog.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]


def test_sweep_runs_several_finetunes_and_registers_the_best(build_once, tmp_path) -> None:
    base = build_once("pretrained-base", make_pretrained_base) / "model"
    workdir = tmp_path
    code, s, out = kubellm_run(
        workdir,
        "--pipeline",
        "llm-lora-sweep",
        "--param",
        f"base_model={base}",
        "--set",
        "tracking.registered_model=sweep-model",
        "--set",
        "sweep.trials=[{lora.r: 2}, {lora.r: 4, optim.lr: 0.005}]",
    )
    assert code == 0, out[-3000:]
    names = [r["stage"] for r in s["stages"] if r["status"] == "FINISHED"]
    assert {"finetune.trial-1", "finetune.trial-2", "evaluate.trial-1", "evaluate.trial-2"} <= set(names)
    assert s["model"]["name"] == "sweep-model" and s["model"]["version"] == 1
