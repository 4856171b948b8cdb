"""``llm-continuous-finetune``: made for recurring runs — fine-tune only when the data changed, and
release only a candidate that beats the current champion on the same held-out data."""
# No `from __future__ import annotations` here (see lifecycle.py).

from typing import Any

from kfp import dsl

from kubellm.components import data, evaluate
from kubellm.config.params import to_param
from kubellm.pipelines._common import Context, pipeline, require
from kubellm.pipelines.finetune import base_model_default, prepare_base_and_data, tune_and_evaluate
from kubellm.pipelines.lifecycle import release

NAME = "llm-continuous-finetune"


def build(ctx: Context) -> Any:
    cfg = require(ctx.cfg, "instruct_data", "finetune")

    @pipeline(NAME, "For recurring runs: fingerprint the instruction data; if it is what the current champion "
              "was trained on, stop quickly and say so. Otherwise fine-tune, evaluate, compare with the champion "
              "on the same held-out set, and promote + deploy only a better model.", ctx)
    def llm_continuous_finetune(
        run_name: str = cfg.name,
        base_model: str = base_model_default(ctx),
        instruct_dataset_uri: str = cfg.instruct_data.sources[0].uri,
        deploy_config: dict = to_param(cfg.release()),
        instruct_data_config: dict = to_param(cfg.instruct_data),
        finetune_config: dict = to_param(cfg.finetune),
        eval_config: dict = to_param(cfg.evaluate),
    ) -> None:
        with ctx.tracked(NAME, run_name) as start:
            common = ctx.stage_args(start)
            check = ctx.configure(data.check_data(config=instruct_data_config, source_uri=instruct_dataset_uri,
                                                  **common), "prep_instruct", "Data changed since the champion?")
            with dsl.If(check.outputs["Output"] == True, name="data-changed"):  # noqa: E712 (a KFP condition)
                base, iprep = prepare_base_and_data(ctx, start=start, base_model=base_model,
                                                    instruct_dataset_uri=instruct_dataset_uri,
                                                    instruct_data_config=instruct_data_config,
                                                    cache_prep=False)  # new data behind the same URI
                ft, ev = tune_and_evaluate(ctx, base=base, iprep=iprep, run_name=run_name,
                                           finetune_config=finetune_config, eval_config=eval_config)
                with dsl.If(ev.outputs["Output"] == True, name="gate-passed"):  # noqa: E712
                    cmp = ctx.configure(evaluate.compare_with_champion(
                        config=eval_config, data=iprep.outputs["dataset"], base_model=base,
                        candidate_results=ev.outputs["results"], **common), "evaluate", "Compare with champion")
                    with dsl.If(cmp.outputs["Output"] == True, name="beats-champion"):  # noqa: E712
                        release(ctx, deploy_config=deploy_config, eval_config=eval_config, data=iprep.outputs["dataset"], start=start, model=ft.outputs["adapter"], base=base,
                                evaluation=ev.outputs["results"], fingerprint=iprep.outputs["Output"])

    return llm_continuous_finetune
