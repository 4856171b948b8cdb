"""The continuous fine-tuning pipeline on KFP's local runner: unchanged data trains nothing, changed data
trains and is compared with the champion."""

from __future__ import annotations

import json

import pytest
from localrun import kubellm_run, make_pretrained_base, stage

# Three pipeline runs (first, unchanged, changed): 2-3 minutes idle, 3x that beside a CPU hog.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1200)]


def test_continuous_skips_unchanged_data_and_trains_on_changed_data(build_once, tmp_path) -> None:
    base = build_once("pretrained-base", make_pretrained_base) / "model"
    workdir = tmp_path / "work"
    workdir.mkdir()
    data = tmp_path / "instructions.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(120)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = (
        "--pipeline",
        "llm-continuous-finetune",
        "--param",
        f"base_model={base}",
        "--set",
        "tracking.registered_model=continuous-model",
        "--set",
        f"instruct_data.sources.0.uri={data}",
        "--set",
        "instruct_data.max_docs=500",
    )

    code, first, out = kubellm_run(workdir, *args)
    assert code == 0, out[-3000:]
    assert stage(first, "check_data")["status"] == "FINISHED"
    assert stage(first, "finetune")["status"] == "FINISHED"
    assert first["model"]["aliases"] == ["candidate", "champion"]

    code, second, out = kubellm_run(workdir, *args)
    assert code == 0, out[-3000:]
    assert stage(second, "check_data")["status"] == "FINISHED"
    assert all(stage(second, n)["status"] == "not run" for n in ("prep_instruct", "finetune", "register"))
    assert second["model"] is None

    with data.open("a") as f:
        f.write(json.dumps({"prompt": "What is 1000 plus 1?", "response": "1000 plus 1 is 1001."}) + "\n")
    code, third, out = kubellm_run(workdir, *args)
    assert code == 0, out[-3000:]
    assert stage(third, "finetune")["status"] == "FINISHED"
    assert stage(third, "evaluate_champion")["status"] == "FINISHED"  # compared with the v1 champion
