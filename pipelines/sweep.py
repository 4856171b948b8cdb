"""``llm-lora-sweep``: several LoRA fine-tunes at once; the best one that passes the gate is released."""
# No `from __future__ import annotations` here (see lifecycle.py).

from kfp import dsl

from kubellm.components import evaluate
from kubellm.pipelines._blocks import fetch_and_prepare, release, tune_and_evaluate
from kubellm.pipelines.api import Builder, gate_passed

NAME = "llm-lora-sweep"


def build(b: Builder):
    @b.pipeline(
        NAME,
        "Several LoRA fine-tunes of one base model in parallel (one pod each), every one "
        "evaluated and gated; the best by the sweep's metric is registered and deployed.",
    )
    def llm_lora_sweep(
        run_name: str = b.cfg.name,
        base_model: str = b.section("finetune").base_model,  # none: a required run parameter
        instruct_dataset_uri: str = b.section("instruct_data").sources[0].uri,
        trials: list = b.section("sweep").items(),
        metric: str = b.section("sweep").metric,
        mode: str = b.section("sweep").mode,
        deploy_config: dict = b.param("release"),
        instruct_data_config: dict = b.param("instruct_data"),
        finetune_config: dict = b.param("finetune"),
        eval_config: dict = b.param("evaluate"),
    ) -> None:
        with b.tracked(run_name):
            base, instructions = fetch_and_prepare(
                b, base_model=base_model, source_uri=instruct_dataset_uri, config=instruct_data_config
            )
            with dsl.ParallelFor(trials, name="trials") as trial:
                ft, ev = tune_and_evaluate(
                    b,
                    base=base,
                    instructions=instructions,
                    trial=trial,
                    finetune_config=finetune_config,
                    eval_config=eval_config,
                )
            best = b.step(
                evaluate.select_best,
                evaluations=dsl.Collected(ev.outputs["results"]),
                adapters=dsl.Collected(ft.outputs["adapter"]),
                metric=metric,
                mode=mode,
            )
            with dsl.If(gate_passed(best), name="some-trial-passed"):
                release(
                    b,
                    candidate=best.outputs["best_adapter"],
                    evaluation=best.outputs["best_evaluation"],
                    base=base,
                    instructions=instructions,
                    deploy_config=deploy_config,
                    eval_config=eval_config,
                )

    return llm_lora_sweep
