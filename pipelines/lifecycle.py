"""``llm-lifecycle``: prep → pretrain → prep instructions → LoRA → evaluate → gate → register → deploy → playground."""
# No `from __future__ import annotations` in pipeline modules: KFP reads the pipeline function's
# annotations as types, and postponed (string) annotations break that.

from typing import Any

from kfp import dsl

from kubellm.components import data, deploy, evaluate, registry, train
from kubellm.config.params import to_param
from kubellm.pipelines._common import Context, pipeline, require

NAME = "llm-lifecycle"


def release(ctx: Context, *, deploy_config: Any, eval_config: Any, start: Any, model: Any, base: Any,
            evaluation: Any, data: Any, fingerprint: Any) -> None:
    """register → deploy (→ playground): the tail every pipeline runs once its gate passed. The deploy
    step scores the served canary on the evaluation's benchmarks (``data``: the prepared held-out set)."""
    common = ctx.stage_args(start)
    reg = ctx.configure(registry.register(model=model, base_model=base, evaluation=evaluation,
                                          data_fingerprint=fingerprint, **common),
                        "register", "Register model (alias: candidate)")
    ctx.configure(deploy.deploy(config=deploy_config, model_uri=reg.outputs["Output"], target=ctx.target,
                                eval_config=eval_config, evaluation=evaluation, data=data, **ctx.placed(),
                                **common),
                  "deploy", "Deploy on KServe (champion when healthy)", retry="deploy")


def build(ctx: Context) -> Any:
    cfg = require(ctx.cfg, "data", "instruct_data", "pretrain", "finetune")

    @pipeline(NAME, "The whole life of a language model: prepare a corpus, pretrain, prepare instructions, "
              "LoRA fine-tune, evaluate against the base model, and — only if the promotion gate passes — "
              "register, deploy on KServe and open a prompt playground. Tracked in MLflow.", ctx)
    def llm_lifecycle(
        run_name: str = cfg.name,
        dataset_uri: str = cfg.data.sources[0].uri,
        instruct_dataset_uri: str = cfg.instruct_data.sources[0].uri,
        deploy_config: dict = to_param(cfg.release()),
        data_config: dict = to_param(cfg.data),
        instruct_data_config: dict = to_param(cfg.instruct_data),
        pretrain_config: dict = to_param(cfg.pretrain),
        finetune_config: dict = to_param(cfg.finetune),
        eval_config: dict = to_param(cfg.evaluate),
    ) -> None:
        with ctx.tracked(NAME, run_name) as start:
            pure = ctx.pure_args()  # the cacheable steps: no run-specific input (see _common)
            prep = ctx.configure(data.prepare_data(config=data_config, source_uri=dataset_uri, **ctx.placed(), **pure).after(start),
                                 "prep", "Prepare corpus", cache=True)
            pre = ctx.configure(train.pretrain(config=pretrain_config, **ctx.placed(),
                                               data=prep.outputs["dataset"], **pure),
                                "pretrain", "Pretrain", retry="train", cache=True)
            iprep = ctx.configure(data.prepare_instructions(config=instruct_data_config, **ctx.placed(),
                                                            source_uri=instruct_dataset_uri,
                                                            tokenizer_from=prep.outputs["dataset"], **pure),
                                  "prep_instruct", "Prepare instructions", cache=True)
            ft = ctx.configure(train.finetune(config=finetune_config, **ctx.placed(),
                                              data=iprep.outputs["dataset"], base_model=pre.outputs["model"],
                                              **pure), "finetune", "LoRA fine-tune", retry="train", cache=True)
            ev = ctx.configure(evaluate.evaluate(config=eval_config, data=iprep.outputs["dataset"],
                                                 model=ft.outputs["adapter"], base_model=pre.outputs["model"],
                                                 **pure), "evaluate", "Evaluate + gate", cache=True)
            with dsl.If(ev.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
                release(ctx, deploy_config=deploy_config, eval_config=eval_config, data=iprep.outputs["dataset"], start=start, model=ft.outputs["adapter"],
                        base=pre.outputs["model"], evaluation=ev.outputs["results"],
                        fingerprint=iprep.outputs["Output"])

    return llm_lifecycle
