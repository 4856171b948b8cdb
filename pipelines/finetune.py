"""``llm-finetune``: an existing base model → prep → LoRA → evaluate → gate → register → deploy."""
# No `from __future__ import annotations` here (see lifecycle.py).

from kfp import dsl

from kubellm.pipelines._blocks import fetch_and_prepare, release, tune_and_evaluate
from kubellm.pipelines.api import Builder, gate_passed

NAME = "llm-finetune"


def build(b: Builder):
    @b.pipeline(
        NAME,
        "LoRA fine-tune an existing model on instruction data, evaluate it against the base "
        "model, and register + deploy it when the promotion gate passes.",
    )
    def llm_finetune(
        run_name: str = b.cfg.name,
        base_model: str = b.section("finetune").base_model,  # none: a required run parameter
        instruct_dataset_uri: str = b.section("instruct_data").sources[0].uri,
        deploy_config: dict = b.param("release"),
        instruct_data_config: dict = b.param("instruct_data"),
        finetune_config: dict = b.param("finetune"),
        eval_config: dict = b.param("evaluate"),
    ) -> None:
        with b.tracked(run_name):
            base, instructions = fetch_and_prepare(
                b, base_model=base_model, source_uri=instruct_dataset_uri, config=instruct_data_config
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

    return llm_finetune
