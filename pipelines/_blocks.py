"""The pieces several built-in pipelines share, written with the public :class:`~kubellm.pipelines.api.Builder`
as a pipeline file of your own would be: the head of the fine-tuning pipelines (fetch the base model,
prepare the instructions with its tokenizer), LoRA + evaluation, and the release tail (register → deploy).
Every step's display name, placement, retries and caching come from ``api.STEPS``.
"""

from __future__ import annotations

from typing import Any

from kubellm.components import data, deploy, evaluate, registry, train
from kubellm.pipelines.api import Builder


def fetch_and_prepare(
    b: Builder, *, base_model: Any, source_uri: Any, config: Any, cache: bool | None = None
) -> tuple[Any, Any]:
    """Fetch the base model → prepare the instruction data ``source_uri`` with its tokenizer. Returns the
    base model (an artifact) and the preparation task; ``cache=False`` for data that changes behind the
    same URI (the continuous pipeline)."""
    base = b.step(train.fetch_model, ref=base_model)
    prep = b.step(
        data.prepare_instructions,
        config=config,
        source_uri=source_uri,
        tokenizer_from=base.outputs["model"],
        cache=cache,
    )
    return base.outputs["model"], prep


def tune_and_evaluate(
    b: Builder, *, base: Any, instructions: Any, finetune_config: Any, eval_config: Any, trial: Any = None
) -> tuple[Any, Any]:
    """LoRA on the prepared ``instructions`` → evaluate against ``base``: the two tasks (both cacheable).
    ``trial``: a sweep's loop item, which makes them one trial of the sweep."""
    per_trial = {"trial": trial} if trial is not None else {}
    ft = b.step(
        train.finetune, config=finetune_config, data=instructions.outputs["dataset"], base_model=base, **per_trial
    )
    ev = b.step(
        evaluate.evaluate,
        config=eval_config,
        data=instructions.outputs["dataset"],
        model=ft.outputs["adapter"],
        base_model=base,
        **per_trial,
    )
    return ft, ev


def release(
    b: Builder, *, candidate: Any, evaluation: Any, base: Any, instructions: Any, deploy_config: Any, eval_config: Any
) -> None:
    """Register ``candidate`` (alias ``candidate``) → deploy it (``champion`` once healthy, then the
    playground): the tail every built-in pipeline runs once its gate passed. The deploy step scores the
    served canary on the evaluation's benchmarks over the prepared held-out set of ``instructions``."""
    reg = b.step(
        registry.register,
        model=candidate,
        base_model=base,
        evaluation=evaluation,
        data_fingerprint=instructions.outputs["Output"],
    )
    b.step(
        deploy.deploy,
        config=deploy_config,
        eval_config=eval_config,
        model_uri=reg.outputs["Output"],
        evaluation=evaluation,
        data=instructions.outputs["dataset"],
    )
