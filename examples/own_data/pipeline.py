"""An own pipeline on own data, built with kubellm's public pipeline API (``kubellm.pipelines.api``).

A parquet corpus → pretrain a small model → a CSV of question/answer pairs → LoRA → evaluate → and,
when the promotion gate passes, register the model; then one step of *your own*: a component that
writes a short "report card" from the evaluation, placed, tracked and summarised like kubellm's own steps.

    python examples/own_data/make_data.py mydata && cd mydata
    kubellm run     --config ../examples/own_data/config.yaml --pipeline ../examples/own_data/pipeline.py
    kubellm compile --config ../examples/own_data/config.yaml --pipeline ../examples/own_data/pipeline.py \\
        --out dist                          # dist/own-data.yaml, for the Kubeflow UI or `kubellm submit`

Every argument a kubellm component needs from the run config (its section, tracking, the parent run,
the platform) is filled in and validated by ``Builder.step`` when the pipeline is built: a misspelt
field such as ``b.param("finetune", {"optim.lrr": 1e-3})`` fails at once, naming ``finetune.optim.lrr``.
"""
# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Output

from kubellm.components import data, evaluate, registry, train
from kubellm.pipelines.api import Builder, component, gate_passed


@component
def report_card(
    tracking: dict, workdir: str, parent_run_id: str, evaluation: Input[Artifact], report: Output[Markdown]
) -> float:
    """Your own step: the evaluation's headline figures as a Markdown table (the UI renders it), logged as
    its own nested MLflow run under the pipeline's parent run."""
    import json
    from pathlib import Path

    from kubellm.stages import StageContext

    doc = json.loads((Path(evaluation.path) / "metrics.json").read_text(encoding="utf-8"))
    keys = ["perplexity", "base_perplexity", "perplexity_ratio", "code_parse_rate", "empty_answer_rate"]
    figures = {k: doc["metrics"][k] for k in keys if k in doc["metrics"]}
    verdict = "passed" if doc["passed"] else "failed"
    Path(report.path).write_text(
        f"# Report card: gate {verdict}\n\n| metric | value |\n|---|---|\n"
        + "\n".join(f"| {k} | {v:.4g} |" for k, v in figures.items())
        + "\n",
        encoding="utf-8",
    )
    with StageContext.from_param(tracking, workdir, parent_run_id).stage("report_card") as tracker:
        tracker.log_metrics({f"card_{k}": v for k, v in figures.items()})
        tracker.log_artifact(Path(report.path), "report_card")
    return float(doc["metrics"]["perplexity"])


def build(b: Builder):
    cfg = b.cfg

    @b.pipeline(
        "own-data",
        "Pretrain on my parquet corpus, LoRA on my question/answer CSV, evaluate, and "
        "register the model when the promotion gate passes.",
    )
    def own_data(
        run_name: str = cfg.name,
        corpus_uri: str = cfg.data.sources[0].uri,
        questions_uri: str = cfg.instruct_data.sources[0].uri,
        finetune_config: dict = b.param("finetune"),
    ) -> None:
        with b.tracked(run_name):
            corpus = b.step(data.prepare_data, source_uri=corpus_uri)
            model = b.step(train.pretrain, data=corpus.outputs["dataset"])
            questions = b.step(
                data.prepare_instructions, source_uri=questions_uri, tokenizer_from=corpus.outputs["dataset"]
            )
            lora = b.step(
                train.finetune,
                config=finetune_config,
                data=questions.outputs["dataset"],
                base_model=model.outputs["model"],
            )
            ev = b.step(
                evaluate.evaluate,
                data=questions.outputs["dataset"],
                model=lora.outputs["adapter"],
                base_model=model.outputs["model"],
            )
            b.step(report_card, "Report card", placement="evaluate", evaluation=ev.outputs["results"])
            with dsl.If(gate_passed(ev), name="gate-passed"):
                b.step(
                    registry.register,
                    model=lora.outputs["adapter"],
                    base_model=model.outputs["model"],
                    evaluation=ev.outputs["results"],
                    data_fingerprint=questions.outputs["Output"],
                )

    return own_data
