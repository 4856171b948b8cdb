"""``llm-lifecycle``: prep → pretrain → prep instructions → LoRA → evaluate → gate → register → deploy → playground."""
# No `from __future__ import annotations` in pipeline modules: KFP reads the pipeline function's
# annotations as types, and postponed (string) annotations break that.

from kfp import dsl

from kubellm.components import data, train
from kubellm.pipelines._blocks import release, tune_and_evaluate
from kubellm.pipelines.api import Builder, gate_passed

NAME = "llm-lifecycle"


def build(b: Builder):
    @b.pipeline(
        NAME,
        "The whole life of a language model: prepare a corpus, pretrain, prepare instructions, "
        "LoRA fine-tune, evaluate against the base model, and — only if the promotion gate passes — "
        "register, deploy on KServe and open a prompt playground. Tracked in MLflow.",
    )
    def llm_lifecycle(
        run_name: str = b.cfg.name,
        dataset_uri: str = b.section("data").sources[0].uri,
        instruct_dataset_uri: str = b.section("instruct_data").sources[0].uri,
        deploy_config: dict = b.param("release"),
        data_config: dict = b.param("data"),
        instruct_data_config: dict = b.param("instruct_data"),
        pretrain_config: dict = b.param("pretrain"),
        finetune_config: dict = b.param("finetune"),
        eval_config: dict = b.param("evaluate"),
    ) -> None:
        with b.tracked(run_name):
            prep = b.step(data.prepare_data, config=data_config, source_uri=dataset_uri)
            base = b.step(train.pretrain, config=pretrain_config, data=prep.outputs["dataset"]).outputs["model"]
            instructions = b.step(
                data.prepare_instructions,
                config=instruct_data_config,
                source_uri=instruct_dataset_uri,
                tokenizer_from=prep.outputs["dataset"],
            )
            ft, ev = tune_and_evaluate(
                b, base=base, instructions=instructions, finetune_config=finetune_config, eval_config=eval_config
            )
            with dsl.If(gate_passed(ev), name="gate-passed"):
                release(
                    b,
                    candidate=ft.outputs["adapter"],
                    evaluation=ev.outputs["results"],
                    base=base,
                    instructions=instructions,
                    deploy_config=deploy_config,
                    eval_config=eval_config,
                )

    return llm_lifecycle
