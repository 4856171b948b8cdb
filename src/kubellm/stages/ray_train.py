"""Ray Train runner: kubellm's own training loop on a Ray cluster (the ``rayjob`` engine's entrypoint).

A ``TorchTrainer`` starts one worker per GPU (per CPU on a laptop, over gloo) and joins them in a torch
process group itself. Each worker then calls the very function a ``torchrun`` rank calls
(:func:`kubellm.train.pretrain.pretrain` / :func:`kubellm.train.finetune.finetune`, which run
:func:`kubellm.train.loop.train`): the loop's :func:`~kubellm.train.dist.init_distributed` finds the group
already initialised and takes its rank, world size and local rank from ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``, which this module sets from Ray's train context (Ray 2.60 sets them too, but that is not
part of its API). Same loop, same data order, same checkpoints: a 2-worker Ray run gives the loss curve of
a 2-process torchrun run (the tests hold it to 1e-5).

Fault tolerance stays kubellm's: rank 0 checkpoints into the output directory (on the shared PVC in a
RayJob), so ``max_failures`` worker-group restarts inside one job and a resubmitted job both resume from
the last checkpoint. Nothing is reported to Ray as a checkpoint, so Ray's own storage only holds its
run-state files: a temporary directory on the driver's node, removed afterwards.

Tracking: the training step passes its stage run's id in ``$KUBELLM_STAGE_RUN_ID``
(:data:`kubellm.stages.base.STAGE_RUN_ENV`, read here once, by the driver); rank 0 attaches to that run
through the same :class:`~kubellm.stages.base.StageContext` a torchrun pod uses (steps already logged
there are not logged again after a resume), the other ranks log nothing.

It is a stage's entry point (as ``kubellm pretrain`` is in a torchrun pod), hence in ``stages``: it runs the
training stage inside its :class:`~kubellm.stages.base.StageContext`.

This is the only kubellm module that imports ray (the ``kubellm[ray]`` extra), and only inside functions;
the step that creates the RayJob never imports it. Entry point, as KubeRay submits it::

    python -m kubellm.stages.ray_train pretrain --workers 8 --gpus-per-worker 1 --data D --out O --set k=v …
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from kubellm.config.run import RunConfig
from kubellm.errors import ConfigError, KubellmError, TrainingError
from kubellm.log import get_logger
from kubellm.stages.base import STAGE_RUN_ENV, StageContext
from kubellm.tracking.base import Tracker
from kubellm.train.loop import TrainResult

log = get_logger("kubellm.train.ray")

STAGES = ("pretrain", "finetune")


def run(
    stage: str,
    run_cfg: RunConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    base_model: str | None = None,
    *,
    workers: int,
    gpus_per_worker: int = 0,
    max_failures: int = 0,
    stage_run_id: str | None = None,
    storage_path: str | Path | None = None,
) -> TrainResult:
    """Train ``stage`` with ``workers`` Ray Train workers on the Ray cluster this process is connected to
    (``ray.init`` is called with its defaults if nobody did: ``$RAY_ADDRESS`` in a RayJob).

    ``gpus_per_worker``: 0 trains on CPUs over gloo (one CPU per worker), 1 on one GPU each over nccl.
    ``max_failures``: worker-group restarts Ray Train makes after a worker dies, each resuming from the
    last checkpoint. Returns the result stored in ``out_dir``; raises :class:`TrainingError` with Ray's
    first error line when the run fails (the checkpoints stay: run again to resume).
    """
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r}: expected one of {list(STAGES)}")
    if getattr(run_cfg, stage) is None:
        raise ConfigError(f"{stage}: the config has no {stage!r} section")
    if workers < 1 or gpus_per_worker not in (0, 1):
        raise ConfigError(f"workers ({workers}) must be ≥ 1 and gpus_per_worker ({gpus_per_worker}) 0 or 1")
    # imported after the checks: ray.train takes seconds to import
    from ray.train import FailureConfig, ScalingConfig, TrainingFailedError
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = gpus_per_worker == 1
    config = {
        "stage": stage,
        "run_config": run_cfg.model_dump(mode="json"),
        "data": str(Path(data_dir).resolve()),
        "out": str(Path(out_dir).resolve()),
        "base": base_model,
        "stage_run_id": stage_run_id,
    }
    scratch = None if storage_path is not None else tempfile.mkdtemp(prefix="kubellm-ray-train-")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpu, resources_per_worker={"GPU": 1} if gpu else {"CPU": 1}
        ),
        run_config=RayRunConfig(
            name=f"kubellm-{stage}",
            storage_path=str(storage_path or scratch),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    log.info("Ray Train: %s with %d worker(s) (%s)", stage, workers, "GPU, nccl" if gpu else "CPU, gloo")
    try:
        trainer.fit()
    except TrainingFailedError as err:
        raise TrainingError(
            f"Ray Train {stage} failed: {_reason(err)}; checkpoints stay in {out_dir}: run again to resume"
        ) from None
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return TrainResult.read(out_dir)


def _reason(err: BaseException) -> str:
    """One line: the first failed worker's exception (``WorkerGroupError.worker_failures``), else the
    error's last line (Ray's message starts with a generic header and ends with the cause)."""
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        rank, cause = min(failures.items())
        return f"worker {rank}: {type(cause).__name__}: {_last_line(cause)}"
    return _last_line(err) or type(err).__name__


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the stage function a torchrun rank runs, in Ray's process group."""
    import ray.train

    from kubellm.log import setup

    setup()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(ctx.get_world_size()), "LOCAL_RANK": str(ctx.get_local_rank())}
    )
    run_cfg = RunConfig.model_validate(config["run_config"])
    ctx = StageContext(run_cfg.tracking, run_cfg.workdir, attach_run_id=config["stage_run_id"], rank=rank)
    if not config["stage_run_id"]:  # no stage run given: nothing is tracked (the launching step owns runs)
        ctx = StageContext(run_cfg.tracking.model_copy(update={"enabled": False}), run_cfg.workdir)
    with ctx.stage(config["stage"]) as tracker:  # rank ≠ 0: a NullTracker
        _run_stage(config["stage"], run_cfg, config["data"], config["out"], config["base"], tracker)


def _run_stage(
    stage: str, run_cfg: RunConfig, data: str, out: str, base: str | None, tracker: Tracker | None
) -> TrainResult:
    if stage == "pretrain":
        from kubellm.train.pretrain import pretrain

        return pretrain(run_cfg.pretrain, data, out, tracker)
    from kubellm.train.finetune import finetune

    section = run_cfg.finetune
    base_model = base or section.base_model
    if not base_model:
        raise ConfigError("no base model: pass --base MODEL or set finetune.base_model")
    return finetune(section, base_model, data, out, tracker)


# ------------------------------------------------------------------------------------------ entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {__name__}",
        description="Run a kubellm training stage "
        "under Ray Train on the Ray cluster of $RAY_ADDRESS (a RayJob's entrypoint).",
    )
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--data", required=True, help="Prepared dataset directory.")
    p.add_argument("--out", required=True, help="Output directory (rerun with the same one to resume).")
    p.add_argument("--base", help="Base model (finetune; default finetune.base_model).")
    p.add_argument("--workers", type=int, required=True, help="Ray Train workers (one per GPU).")
    p.add_argument("--gpus-per-worker", type=int, choices=(0, 1), default=0)
    p.add_argument("--max-failures", type=int, default=0, help="Worker-group restarts before failing.")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Config override (repeatable), as `kubellm --set`.",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """The entrypoint: 0 on success; a kubellm error prints ``error: …`` and returns its exit code."""
    from kubellm.config import default_config_path, load_config
    from kubellm.log import print_table, setup

    setup()
    args = _parser().parse_args(argv)
    try:
        # as `kubellm pretrain --set …` in a torchrun pod: the embedded default, then the overrides
        cfg = load_config(default_config_path(), args.overrides)
        result = run(
            args.stage,
            cfg,
            args.data,
            args.out,
            args.base,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            max_failures=args.max_failures,
            stage_run_id=os.environ.get(STAGE_RUN_ENV) or None,
        )
    except KubellmError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print_table(
        f"{args.stage} (Ray Train, {args.workers} workers)",
        [{k: v for k, v in result.to_json().items() if k != "output_dir"}],
    )
    print(f"output: {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
