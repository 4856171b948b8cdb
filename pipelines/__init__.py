"""KFP pipelines: composition only (installed as ``kubellm.pipelines``); ``api`` is the public API for
users' own pipelines.

``PIPELINES`` maps each pipeline's name to the function that builds it from a run config and a target
(``local`` for KFP's local runner, ``cluster`` for a compiled pipeline with Kubernetes placement).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubellm.config import RunConfig
from kubellm.errors import ConfigError
from kubellm.pipelines import continuous, finetune, lifecycle, sweep
from kubellm.pipelines._common import Context, Target

PIPELINES: dict[str, Callable[[Context], Any]] = {
    lifecycle.NAME: lifecycle.build,
    finetune.NAME: finetune.build,
    sweep.NAME: sweep.build,
    continuous.NAME: continuous.build,
}

#: Stages of each pipeline in the order they run (the run summary lists them in this order);
#: ``finetune.*`` stands for every trial of a sweep. The playground has no stage of its own: the deploy
#: stage opens it.
STAGES: dict[str, list[str]] = {
    lifecycle.NAME: ["prep", "pretrain", "prep_instruct", "finetune", "evaluate", "register", "deploy"],
    finetune.NAME: ["prep_instruct", "finetune", "evaluate", "register", "deploy"],
    sweep.NAME: ["prep_instruct", "finetune.*", "evaluate.*", "register", "deploy"],
    continuous.NAME: ["check_data", "prep_instruct", "finetune", "evaluate", "evaluate_champion", "register",
                      "deploy"],
}


def build(name: str, cfg: RunConfig, target: Target, *, run_id: str | None = None, caching: bool = True) -> Any:
    """The pipeline function ``name`` built for ``target`` from ``cfg`` (validated before anything).
    ``run_id``: a local run's id; ``caching=False``: no step cacheable (see :class:`Context`)."""
    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline {name!r}; expected one of {sorted(PIPELINES)}")
    return PIPELINES[name](Context(cfg, target, run_id, caching))
