"""Ray Train against torchrun: the same 2-process gloo run of kubellm's loop under both launchers.

- per-step cost: steady-state seconds per optimizer step under Ray Train (``kubellm.stages.ray_train``,
  2 workers) over the same under ``torchrun --standalone --nproc_per_node 2`` (goal ≤ 1.05×: both run the
  identical loop in an identical gloo process group, so Ray should add nothing per step). Taken from the
  loop's own ``history.jsonl`` windows (tokens/s), the first window dropped as warm-up;
- start-up: seconds from the launch call to the loop's first line of work, i.e. the launcher's wall time
  minus the loop's own ``TrainResult.seconds`` (Ray: scheduling the controller and worker actors, each a
  fresh process importing torch; torchrun: forking two processes that do the same imports);
- the local Ray cluster's own start (``ray.init`` with 2 CPUs), paid once per machine or RayJob.

Model: the ``tiny`` preset on the bench_train pretraining data (256-token blocks), fp32, micro-batch 8.
Both launchers alternate over the rounds and each keeps its best round. Wall-clock figures on shared
2-core machines: the load average is in the note.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PER_STEP_GOAL = 1.05
STARTUP_GOAL = 3.0


def _row(measure: str, kubellm: float, baseline: float | None, goal: str, ok: bool, note: str = "") -> dict:
    return {
        "benchmark": "ray",
        "measure": measure,
        "kubellm": round(kubellm, 4),
        "baseline": round(baseline, 4) if baseline is not None else None,
        "ratio": round(kubellm / baseline, 3) if baseline else None,
        "goal": goal,
        "ok": ok,
        "note": note,
    }


def _sets(steps: int, log_every: int) -> list[str]:
    loop = {
        "max_steps": steps,
        "log_every": log_every,
        "checkpoint_every": steps,
        "precision": "fp32",
        "micro_batch_size": 8,
        "eval_batches": 2,
    }
    return [f"pretrain.loop.{k}={v}" for k, v in loop.items()] + ["tracking.enabled=false"]


def seconds_per_step(out: Path) -> float:
    """Steady-state seconds per step from the history windows (tokens/s of each window), warm-up dropped."""
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    windows = history[1:] or history
    tokens_per_step = json.loads((out / "kubellm_train.json").read_text())["tokens_seen"] / history[-1]["step"]
    per_step = [tokens_per_step / w["tokens_per_s"] for w in windows]
    return sorted(per_step)[len(per_step) // 2]  # median window


#: Runs a command and prints the peak resident set of its largest descendant (a torchrun worker), in KiB.
_MAX_RSS = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)


def torchrun(data: Path, out: Path, sets: list[str]) -> tuple[float, int]:
    """``kubellm pretrain`` under ``torchrun --nproc_per_node 2``: wall seconds, and the peak RSS (KiB)
    of its largest process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _MAX_RSS,
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(BIN / "kubellm"),
            "pretrain",
            "--data",
            str(data),
            "--out",
            str(out),
            *[a for s in sets for a in ("--set", s)],
        ],
        cwd=out.parent,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - t0, int(proc.stderr.strip().splitlines()[-1])


def _torchrun_wall(data: Path, out: Path, sets: list[str]) -> float:
    return torchrun(data, out, sets)[0]


def _ray(data: Path, out: Path, sets: list[str]) -> float:
    from kubellm.config import default_config_path, load_config
    from kubellm.stages.ray_train import run

    cfg = load_config(default_config_path(), [*sets, f"workdir={out.parent}"])  # as the torchrun CLI does
    t0 = time.perf_counter()
    run("pretrain", cfg, data, out, workers=2, storage_path=out.parent / f"{out.name}-ray")
    return time.perf_counter() - t0


def run(quick: bool) -> list[dict]:
    try:
        import ray
    except ImportError:
        return [{"benchmark": "ray", "measure": "skipped: the kubellm[ray] extra is not installed", "ok": True}]
    from bench_train import prepare_data

    steps, log_every, rounds = (20, 5, 1) if quick else (200, 20, 2)
    sets = _sets(steps, log_every)
    best: dict[str, dict[str, float]] = {"ray": {}, "torchrun": {}}
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "OMP_NUM_THREADS")}
    # A loopback-only cluster that lives for this benchmark: no token file under ~/.ray.
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    temp = tempfile.mkdtemp(prefix="kray-")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        pre, _ = prepare_data(work, quick)
        t0 = time.perf_counter()
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp,
            log_to_driver=False,
            configure_logging=False,
        )
        init_s = time.perf_counter() - t0
        try:
            for r in range(rounds):
                for name, launch in (("torchrun", _torchrun_wall), ("ray", _ray)):
                    out = work / f"{name}-{r}"
                    wall = launch(pre, out, sets)
                    loop_s = json.loads((out / "kubellm_train.json").read_text())["seconds"]
                    measured = {"step": seconds_per_step(out), "startup": wall - loop_s}
                    for k, v in measured.items():
                        best[name][k] = min(best[name].get(k, float("inf")), v)
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    load = f"load avg {os.getloadavg()[0]:.1f}; tiny preset, 2 gloo workers, {steps} steps"
    step_ratio = best["ray"]["step"] / best["torchrun"]["step"]
    start_ratio = best["ray"]["startup"] / best["torchrun"]["startup"]
    return [
        _row(
            "seconds per step (Ray Train vs torchrun)",
            best["ray"]["step"],
            best["torchrun"]["step"],
            f"≤ {PER_STEP_GOAL}×",
            step_ratio <= PER_STEP_GOAL,
            load,
        ),
        _row(
            "start-up seconds before the loop (Ray Train vs torchrun)",
            best["ray"]["startup"],
            best["torchrun"]["startup"],
            f"≤ {STARTUP_GOAL}×",
            start_ratio <= STARTUP_GOAL,
            load,
        ),
        _row("local Ray cluster start (ray.init, 2 CPUs) seconds", init_s, None, "reported", True, load),
    ]
