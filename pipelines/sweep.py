"""``llm-lora-sweep``: several LoRA fine-tunes at once; the best one that passes the gate is released."""
# No `from __future__ import annotations` here (see lifecycle.py).

from typing import Any

from kfp import dsl

from kubellm.components import evaluate, train
from kubellm.config.params import to_param
from kubellm.pipelines._common import Context, pipeline, require
from kubellm.pipelines.finetune import base_model_default, prepare_base_and_data
from kubellm.pipelines.lifecycle import release

NAME = "llm-lora-sweep"


def build(ctx: Context) -> Any:
    cfg = require(ctx.cfg, "instruct_data", "finetune")

    @pipeline(NAME, "Several LoRA fine-tunes of one base model in parallel (one pod each), every one "
              "evaluated and gated; the best by the sweep's metric is registered and deployed.", ctx)
    def llm_lora_sweep(
        run_name: str = cfg.name,
        base_model: str = base_model_default(ctx),
        instruct_dataset_uri: str = cfg.instruct_data.sources[0].uri,
        trials: list = cfg.sweep.items(),
        metric: str = cfg.sweep.metric,
        mode: str = cfg.sweep.mode,
        deploy_config: dict = to_param(cfg.release()),
        instruct_data_config: dict = to_param(cfg.instruct_data),
        finetune_config: dict = to_param(cfg.finetune),
        eval_config: dict = to_param(cfg.evaluate),
    ) -> None:
        with ctx.tracked(NAME, run_name) as start:
            base, iprep = prepare_base_and_data(ctx, start=start, base_model=base_model,
                                                instruct_dataset_uri=instruct_dataset_uri,
                                                instruct_data_config=instruct_data_config)
            pure = ctx.pure_args()  # the parent run is found by KFP run id, as in every cacheable step
            with dsl.ParallelFor(trials, name="trials") as trial:
                ft = ctx.configure(train.finetune(config=finetune_config, **ctx.placed(),
                                                  data=iprep.outputs["dataset"], base_model=base, trial=trial,
                                                  **pure), "finetune", "LoRA fine-tune (trial)", retry="train",
                                   cache=True)
                ev = ctx.configure(evaluate.evaluate(config=eval_config, data=iprep.outputs["dataset"],
                                                     model=ft.outputs["adapter"], base_model=base, trial=trial,
                                                     **pure), "evaluate", "Evaluate + gate (trial)", cache=True)
            best = ctx.configure(evaluate.select_best(evaluations=dsl.Collected(ev.outputs["results"]),
                                                      adapters=dsl.Collected(ft.outputs["adapter"]),
                                                      metric=metric, mode=mode),
                                 "evaluate", "Select the best trial")
            with dsl.If(best.outputs["Output"] == True, name="some-trial-passed"):  # noqa: E712 (a KFP condition)
                release(ctx, deploy_config=deploy_config, eval_config=eval_config, data=iprep.outputs["dataset"], start=start, model=best.outputs["best_adapter"], base=base,
                        evaluation=best.outputs["best_evaluation"], fingerprint=iprep.outputs["Output"])

    return llm_lora_sweep
