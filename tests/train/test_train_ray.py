"""The Ray Train engine on a real local Ray cluster: a 2-worker gloo run whose worker is killed fails with
one line, resumes from its last checkpoint when submitted again, and then ends exactly where an
uninterrupted 2-process torchrun run does (loss curve and weights within 1e-5), with rank 0 alone having
logged each step once into the stage's MLflow run. One interrupted run instead of a second, uninterrupted
one keeps the module near a minute on an idle 2-core machine: each Ray fit starts fresh worker processes.

One Ray cluster (2 CPUs, :func:`rayhelpers.local_ray`) serves the module and is shut down by its finaliser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rayhelpers import local_ray

from kubellm.config import default_config_path, load_config
from kubellm.errors import TrainingError
from kubellm.train import checkpoint as ckpt
from kubellm.train.loop import HISTORY_FILE

# A local Ray cluster per run, a killed and a resubmitted run: 80 s idle; beside a CPU hog the cluster's
# start and the module fixture's two runs took over 10 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
STEPS = 60
LOOP = {
    "max_steps": STEPS,
    "log_every": 10,
    "checkpoint_every": 10,
    "precision": "fp32",
    "micro_batch_size": 2,
    "eval_batches": 4,
}
SETS = [f"pretrain.loop.{k}={v}" for k, v in LOOP.items()]


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=2) as ray:
        yield ray


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / HISTORY_FILE).read_text().splitlines()]


def _assert_same_training(a: Path, b: Path) -> None:
    """Same logged steps, loss and validation loss within 1e-5, same weights."""
    import torch
    from safetensors.torch import load_file

    ha, hb = _history(a), _history(b)
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == list(range(10, STEPS + 1, 10))
    for x, y in zip(ha, hb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert ("val_loss" in x) == ("val_loss" in y)
        if "val_loss" in x:
            assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-5)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def _train_workers() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::RayTrainWorker")]


@pytest.fixture(scope="module")
def resumed_run(ray_cluster, pretrain_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 2-worker Ray Train run logging into a stage run of a sqlite MLflow store, one of whose workers
    is killed (SIGKILL) after the first checkpoint, then submitted again: (first error, last complete
    checkpoint before the resubmission, the result, the MLflow client, the run id)."""
    from kubellm.stages.ray_train import run
    from kubellm.tracking.connect import mlflow_client

    root = tmp_path_factory.mktemp("ray-run")
    out = root / "out"
    cfg = load_config(default_config_path(), [*SETS, f"workdir={root}"])
    client, _ = mlflow_client(cfg.tracking, cfg.workdir)
    run_id = client.create_run(client.create_experiment("ray"), tags={"stage": "pretrain"}).info.run_id
    failure: list[BaseException] = []

    def first_attempt() -> None:
        try:
            run("pretrain", cfg, pretrain_data, out, workers=2, stage_run_id=run_id, storage_path=root / "ray")
        except BaseException as err:  # asserted by the tests
            failure.append(err)

    attempt = threading.Thread(target=first_attempt)
    attempt.start()
    deadline = time.monotonic() + 420  # a Ray cluster's first run beside a CPU hog: minutes
    while not ckpt.complete_checkpoints(out) and attempt.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert attempt.is_alive(), f"the first attempt finished before a worker could be killed: {failure}"
    assert ckpt.complete_checkpoints(out), "no checkpoint within 420 s of the first attempt's start"
    workers = _train_workers()
    assert len(workers) == 2, f"{len(workers)} Ray Train workers found, expected 2"
    workers[-1].send_signal(signal.SIGKILL)
    attempt.join(180)
    assert not attempt.is_alive()
    last = max(step for step, _ in ckpt.complete_checkpoints(out))
    result = run("pretrain", cfg, pretrain_data, out, workers=2, stage_run_id=run_id, storage_path=root / "ray")
    return failure, last, result, client, run_id


def test_killed_worker_fails_the_run_and_a_resubmitted_run_resumes(resumed_run) -> None:
    failure, last, result, _, _ = resumed_run
    assert failure and isinstance(failure[0], TrainingError), failure
    message = str(failure[0])
    assert message.startswith("Ray Train pretrain failed: ") and message.endswith("run again to resume")
    assert "\n" not in message
    assert 10 <= last < STEPS
    assert result.resumed_from_step is not None and last <= result.resumed_from_step < STEPS
    assert result.steps == STEPS
    assert result.tokens_seen == STEPS * 2 * LOOP["micro_batch_size"] * 32  # two ranks' batches of 32-token blocks


def test_ray_train_matches_torchrun_and_only_rank_0_logs(resumed_run, pretrain_data: Path, tmp_path: Path) -> None:
    """The resumed Ray run ends exactly where an uninterrupted 2-process torchrun run of the same config
    does, and its MLflow run holds the loss history once, from rank 0, across both attempts."""
    _, _, result, client, run_id = resumed_run
    out = tmp_path / "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(BIN / "kubellm"),
            "pretrain",
            "--data",
            str(pretrain_data),
            "--out",
            str(out),
            *[a for s in SETS for a in ("--set", s)],
            "--set",
            "tracking.enabled=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_training(result.output_dir, out)

    losses = client.get_metric_history(run_id, "loss")
    history = _history(result.output_dir)
    assert [m.step for m in losses] == [h["step"] for h in history]  # every step once: rank 0, no repeats
    assert [m.value for m in losses] == pytest.approx([h["loss"] for h in history], abs=1e-9)
    assert client.get_run(run_id).data.params["world_size"] == "2"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_an_fsdp_stage_under_ray_train_shards_and_trains_as_one_process_does(
    ray_cluster, pretrain_data: Path, tmp_path: Path
) -> None:
    """``loop.parallelism: fsdp`` through TorchTrainer's own process group: 2 workers hold half the state
    each, write sharded checkpoints, and follow the loss curve of one process reading the same rows."""
    from kubellm.stages.ray_train import run
    from kubellm.train.pretrain import pretrain

    loop = {
        **LOOP,
        "max_steps": 12,
        "log_every": 2,
        "checkpoint_every": 6,
        "parallelism": "fsdp",
        "global_batch_size": 4,
    }
    cfg = load_config(
        default_config_path(),
        [*[f"pretrain.loop.{k}={v}" for k, v in loop.items()], f"workdir={tmp_path}", "tracking.enabled=false"],
    )
    sharded = run("pretrain", cfg, pretrain_data, tmp_path / "ray", workers=2, storage_path=tmp_path / "ray-run")
    single = pretrain(cfg.pretrain, pretrain_data, tmp_path / "single")  # 1 process: 2 micro-batches a step
    ha, hb = _history(sharded.output_dir), _history(single.output_dir)
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == list(range(2, 13, 2))
    for x, y in zip(ha, hb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert ha[-1]["loss"] < ha[0]["loss"]
    assert sharded.parallelism == "fsdp" and sharded.rank_state_bytes <= 0.6 * single.rank_state_bytes
