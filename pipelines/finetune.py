"""``llm-finetune``: an existing base model → prep → LoRA → evaluate → gate → register → deploy."""
# No `from __future__ import annotations` here (see lifecycle.py).

from typing import Any

from kfp import dsl

from kubellm.components import data, evaluate, train
from kubellm.config.params import to_param
from kubellm.pipelines._common import Context, pipeline, require
from kubellm.pipelines.lifecycle import release

NAME = "llm-finetune"


def base_model_default(ctx: Context) -> str | None:
    """The UI default of ``base_model``: ``finetune.base_model``, or none (a required run parameter)."""
    return ctx.cfg.finetune.base_model


def prepare_base_and_data(ctx: Context, *, start: Any, base_model: Any, instruct_dataset_uri: Any,
                          instruct_data_config: Any, cache_prep: bool = True) -> tuple[Any, Any]:
    """fetch base → prep instructions with its tokenizer: the head of every fine-tuning pipeline.
    Returns the base model artifact and the instruction prep task. ``cache_prep=False`` for data that
    changes behind the same URI (the continuous pipeline)."""
    base = ctx.configure(train.fetch_model(ref=base_model, tracking=ctx.tracking, workdir=ctx.workdir),
                         "finetune", "Fetch base model", cache=True)
    iprep = ctx.configure(data.prepare_instructions(config=instruct_data_config, source_uri=instruct_dataset_uri,
                                                    tokenizer_from=base.outputs["model"], **ctx.placed(),
                                                    **ctx.pure_args()).after(start),
                          "prep_instruct", "Prepare instructions", cache=cache_prep)
    return base.outputs["model"], iprep


def tune_and_evaluate(ctx: Context, *, base: Any, iprep: Any, run_name: Any, finetune_config: Any,
                      eval_config: Any) -> tuple[Any, Any]:
    """LoRA → evaluate against the base; returns the fine-tune and evaluation tasks (both cacheable)."""
    pure = ctx.pure_args()
    ft = ctx.configure(train.finetune(config=finetune_config, **ctx.placed(), data=iprep.outputs["dataset"],
                                      base_model=base, **pure), "finetune", "LoRA fine-tune", retry="train",
                       cache=True)
    ev = ctx.configure(evaluate.evaluate(config=eval_config, data=iprep.outputs["dataset"],
                                         model=ft.outputs["adapter"], base_model=base, **pure),
                       "evaluate", "Evaluate + gate", cache=True)
    return ft, ev


def build(ctx: Context) -> Any:
    cfg = require(ctx.cfg, "instruct_data", "finetune")

    @pipeline(NAME, "LoRA fine-tune an existing model on instruction data, evaluate it against the base "
              "model, and register + deploy it when the promotion gate passes.", ctx)
    def llm_finetune(
        run_name: str = cfg.name,
        base_model: str = base_model_default(ctx),
        instruct_dataset_uri: str = cfg.instruct_data.sources[0].uri,
        deploy_config: dict = to_param(cfg.release()),
        instruct_data_config: dict = to_param(cfg.instruct_data),
        finetune_config: dict = to_param(cfg.finetune),
        eval_config: dict = to_param(cfg.evaluate),
    ) -> None:
        with ctx.tracked(NAME, run_name) as start:
            base, iprep = prepare_base_and_data(ctx, start=start, base_model=base_model,
                                                instruct_dataset_uri=instruct_dataset_uri,
                                                instruct_data_config=instruct_data_config)
            ft, ev = tune_and_evaluate(ctx, base=base, iprep=iprep, run_name=run_name,
                                       finetune_config=finetune_config, eval_config=eval_config)
            with dsl.If(ev.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
                release(ctx, deploy_config=deploy_config, eval_config=eval_config, data=iprep.outputs["dataset"], start=start, model=ft.outputs["adapter"], base=base,
                        evaluation=ev.outputs["results"], fingerprint=iprep.outputs["Output"])

    return llm_finetune
