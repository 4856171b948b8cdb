"""Orchestration overhead of a local lifecycle run, and compile time.

- ``kubellm run`` of ``llm-lifecycle`` in a fresh working directory, on the embedded default
  (``configs/local.yaml``) and with 600 pretraining + 300 LoRA steps (10× the 60 + 30 of the default the
  goals were set on; ``quick``: tiny settings only): total wall time against the sum of the stages' own
  compute time, as each stage's MLflow run measured it (reported per stage). The difference is what
  orchestration costs: one Python process per task (start-up, KFP's executor, the imports of
  mlflow — ~1 s, plus ~0.7 s for its sqlite store locally — and, in the steps that use them,
  torch/transformers/peft), KFP's local runner, artifact hand-over, MLflow run bookkeeping. It is a
  fixed cost per task, so its share falls as stages grow. Goals: under 20 % of the wall time and at most
  1.5 s per task process on the default; under 10 % at 10× the steps. ``tests/unit/test_import_budget.py``
  and the own-data pipeline test pin what each command and task imports.
- ``kubellm compile``: all pipelines and components, wall seconds (in-process, after imports).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICK = [
    "data.max_docs=40",
    "pretrain.loop.max_steps=6",
    "instruct_data.max_docs=150",
    "finetune.loop.max_steps=4",
    "evaluate.num_prompts=2",
    "evaluate.max_batches=2",
    "evaluate.gate.max_perplexity_ratio=1.5",
]


def _row(
    measure: str, kubellm: float | None, baseline: float | None, goal: str = "", ok: bool | None = None, note: str = ""
) -> dict:
    ratio = round(kubellm / baseline, 3) if kubellm is not None and baseline else None
    return {
        "benchmark": "pipeline",
        "measure": measure,
        "kubellm": None if kubellm is None else round(kubellm, 2),
        "baseline": None if baseline is None else round(baseline, 2),
        "ratio": ratio,
        "goal": goal,
        "ok": ok,
        "note": note,
    }


#: 10× the training steps of the embedded default the overhead goals were set on (60 pretraining and 30
#: LoRA steps); today's default trains 500 and 150 steps, so its own row is already ~8× that.
SCALED_LABEL = "600 + 300 training steps"
SCALED = [
    "pretrain.loop.max_steps=600",
    "pretrain.loop.checkpoint_every=200",
    "finetune.loop.max_steps=300",
    "finetune.loop.checkpoint_every=100",
]


def _lifecycle(label: str, overrides: list[str], per_stage: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-pipeline-") as tmp:
        sets = [x for s in overrides for x in ("--set", s)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "kubellm.cli",
                "run",
                "--config",
                str(REPO / "configs" / "local.yaml"),
                "--set",
                f"workdir={tmp}",
                *sets,
                "--quiet",
            ],
            capture_output=True,
            text=True,
            cwd=tmp,
            env=env,
        )
        summaries = list(Path(tmp, "runs").glob("*/summary.json"))
        if proc.returncode != 0 or not summaries:
            raise RuntimeError(f"kubellm run failed ({proc.returncode}): {proc.stderr[-2000:]}")
        s = json.loads(summaries[0].read_text())
        wall = s["wall_seconds"]
        compute = sum(r["seconds"] or 0.0 for r in s["stages"])
        if per_stage:
            for r in s["stages"]:
                rows.append(_row(f"{label}: stage {r['stage']} (s)", r["seconds"], None, note=r["status"]))
        overhead = (wall - compute) / wall
        ran = [r for r in s["stages"] if r["seconds"] is not None]
        tasks = len(ran) + 2  # + the start-run and finish-run tasks
        goal = 0.20 if label != SCALED_LABEL else 0.10
        rows.append(
            _row(
                f"{label}: wall (s) vs sum of stage compute (s)",
                wall,
                compute,
                f"overhead < {goal:.0%}",
                overhead < goal,
                f"overhead {overhead:.0%} of wall: {wall - compute:.1f} s over {tasks} task processes",
            )
        )
        if label != SCALED_LABEL:
            per_task = (wall - compute) / tasks
            rows.append(
                _row(
                    f"{label}: orchestration per task process (s)",
                    per_task,
                    None,
                    "<= 1.5 s",
                    per_task <= 1.5,
                    "process start, imports (mlflow ~1 s, its sqlite store ~0.7 s "
                    "locally, torch/transformers in training steps), MLflow run bookkeeping",
                )
            )
    return rows


def run(quick: bool) -> list[dict]:
    rows = _lifecycle("embedded default" if not quick else "tiny", QUICK if quick else [], per_stage=True)
    if not quick:
        rows += _lifecycle(SCALED_LABEL, SCALED, per_stage=False)

    sys.path.insert(0, str(REPO / "src"))
    from kubellm.config import load_config
    from kubellm.pipelines._runner import compile_all

    cfg = load_config(REPO / "configs" / "local.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        compile_all(cfg, tmp)  # warm: imports and first-use caches
        t0 = time.perf_counter()
        files = compile_all(cfg, tmp)
        rows.append(
            _row("compile all pipelines + components (s)", time.perf_counter() - t0, None, note=f"{len(files)} files")
        )
    return rows
