"""``llm-continuous-finetune``: made for recurring runs — fine-tune only when the data changed, and
release only a candidate that beats the current champion on the same held-out data."""
# No `from __future__ import annotations` here (see lifecycle.py).

from kfp import dsl

from kubellm.components import data, evaluate
from kubellm.pipelines._blocks import fetch_and_prepare, release, tune_and_evaluate
from kubellm.pipelines.api import Builder, gate_passed

NAME = "llm-continuous-finetune"


def build(b: Builder):
    @b.pipeline(
        NAME,
        "For recurring runs: fingerprint the instruction data; if it is what the current champion "
        "was trained on, stop quickly and say so. Otherwise fine-tune, evaluate, compare with the champion "
        "on the same held-out set, and promote + deploy only a better model.",
    )
    def llm_continuous_finetune(
        run_name: str = b.cfg.name,
        base_model: str = b.section("finetune").base_model,  # none: a required run parameter
        instruct_dataset_uri: str = b.section("instruct_data").sources[0].uri,
        deploy_config: dict = b.param("release"),
        instruct_data_config: dict = b.param("instruct_data"),
        finetune_config: dict = b.param("finetune"),
        eval_config: dict = b.param("evaluate"),
    ) -> None:
        with b.tracked(run_name):
            check = b.step(data.check_data, config=instruct_data_config, source_uri=instruct_dataset_uri)
            with dsl.If(check.outputs["Output"] == True, name="data-changed"):  # a KFP condition
                base, instructions = fetch_and_prepare(
                    b, base_model=base_model, source_uri=instruct_dataset_uri, config=instruct_data_config, cache=False
                )  # new data behind the same URI
                ft, ev = tune_and_evaluate(
                    b, base=base, instructions=instructions, finetune_config=finetune_config, eval_config=eval_config
                )
                with dsl.If(gate_passed(ev), name="gate-passed"):
                    champion = b.step(
                        evaluate.compare_with_champion,
                        config=eval_config,
                        data=instructions.outputs["dataset"],
                        base_model=base,
                        candidate_results=ev.outputs["results"],
                    )
                    with dsl.If(champion.outputs["Output"] == True, name="beats-champion"):
                        release(
                            b,
                            candidate=ft.outputs["adapter"],
                            evaluation=ev.outputs["results"],
                            base=base,
                            instructions=instructions,
                            deploy_config=deploy_config,
                            eval_config=eval_config,
                        )

    return llm_continuous_finetune
