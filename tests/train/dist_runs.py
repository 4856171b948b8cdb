"""Run several training runs in one ``torchrun`` job, one after the other, on the same process group.

    torchrun --standalone --nproc_per_node 2 tests/train/dist_runs.py plan.json

``plan.json`` is a list of runs: ``{"stage": "pretrain" | "finetune", "config": {...}, "data": DIR,
"out": DIR, "base": DIR (finetune), "sigterm_at": STEP (optional)}``. A run with ``sigterm_at`` gets a
real SIGTERM on rank 0 when the loop logs that step and must stop with exit code 143's exception
(:class:`~kubellm.train.loop.TrainingInterrupted`). Starting torchrun once for all of them instead of
once per run saves ~10 s of interpreter and import start-up per run on these 2-core machines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import SigtermAt  # this script's folder is on sys.path when it runs


def main(plan_path: str) -> None:
    import torch.distributed as dist

    from kubellm.config.train import FinetuneConfig, PretrainConfig
    from kubellm.train.dist import init_distributed, shutdown
    from kubellm.train.finetune import finetune
    from kubellm.train.loop import TrainingInterrupted
    from kubellm.train.pretrain import pretrain

    ctx = init_distributed()  # one group for all runs: the loop joins it instead of creating its own
    try:
        for run in json.loads(Path(plan_path).read_text(encoding="utf-8")):
            tracker = SigtermAt(run["sigterm_at"]) if "sigterm_at" in run else None
            try:
                if run["stage"] == "pretrain":
                    pretrain(PretrainConfig.model_validate(run["config"]), run["data"], run["out"], tracker)
                else:
                    finetune(
                        FinetuneConfig.model_validate(run["config"]), run["base"], run["data"], run["out"], tracker
                    )
            except TrainingInterrupted:
                if "sigterm_at" not in run:
                    raise
            else:
                if "sigterm_at" in run:
                    sys.exit(f"{run['out']}: ran to the end despite the SIGTERM at step {run['sigterm_at']}")
            dist.barrier()
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1])
