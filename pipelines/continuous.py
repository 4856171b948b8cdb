"""``llm-continuous-finetune``: made for recurring runs — fine-tune only when the data changed, and
release only a candidate that beats the current champion on the same held-out data."""


from typing import Any

from kfp import dsl

from kubellm.components import data, evaluate, tracking, train
from kubellm.config.params import to_param
from kubellm.pipelines._common import Context, require
from kubellm.pipelines.finetune import base_model_default, prepare_base_and_data
from kubellm.pipelines.lifecycle import release

NAME = "llm-continuous-finetune"


def build(ctx: Context) -> Any:
    cfg = require(ctx.cfg, "instruct_data", "finetune")
    default_base = base_model_default(ctx)

    @dsl.pipeline(name=NAME, description="For recurring runs: fingerprint the instruction data; if it is what "
                  "the current champion was trained on, stop quickly and say so. Otherwise fine-tune, "
                  "evaluate, compare with the champion on the same held-out set, and promote + deploy only "
                  "a better model.")
    def llm_continuous_finetune(
        run_name: str = cfg.name,
        base_model: str = default_base,
        instruct_dataset_uri: str = cfg.instruct_data.sources[0].uri,
        run_config: dict = to_param(cfg),
        instruct_data_config: dict = to_param(cfg.instruct_data),
        finetune_config: dict = to_param(cfg.finetune),
        eval_config: dict = to_param(cfg.evaluate),
    ) -> None:
        """Continuous fine-tuning on new data.

        Args:
            run_name: Name of the MLflow parent run.
            base_model: Model to adapt: a model directory, models:/name@alias, or a Hugging Face Hub id.
            instruct_dataset_uri: Instruction data that grows over time (a path, glob, hf://…, s3://…).
            run_config: The full run config (deploy, serve and platform sections), as validated by kubellm.
            instruct_data_config: Data preparation settings of the instruction data (kubellm DataConfig).
            finetune_config: LoRA settings, optimizer and loop (kubellm FinetuneConfig).
            eval_config: Evaluation settings and the promotion gate (kubellm EvalConfig).
        """
        ids = {"pipeline_name": NAME, "run_name": run_name, "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        exit_task = ctx.configure(tracking.finish_run(tracking=ctx.tracking, workdir=ctx.workdir, **ids),
                                  "register", "Record final status in MLflow")
        with dsl.ExitHandler(exit_task, name="continuous"):
            start = ctx.configure(tracking.start_run(run_config=run_config, tracking=ctx.tracking,
                                                     workdir=ctx.workdir, **ids), "register", "Start MLflow run")
            common = {"tracking": ctx.tracking, "workdir": ctx.workdir, "parent_run_id": start.output}
            check = ctx.configure(data.check_data(config=instruct_data_config, source_uri=instruct_dataset_uri,
                                                  **common),
                                  "prep_instruct", "Data changed since the champion?")
            with dsl.If(check.outputs["Output"] == True, name="data-changed"):  # noqa: E712 (a KFP condition)
                head = prepare_base_and_data(ctx, start=start, base_model=base_model,
                                     instruct_dataset_uri=instruct_dataset_uri,
                                     instruct_data_config=instruct_data_config)
                base, iprep = head["base"].outputs["model"], head["iprep"]
                ft = ctx.configure(train.finetune(config=finetune_config, run_config=run_config, data=iprep.outputs["dataset"],
                                                  base_model=base, **common), "finetune", "LoRA fine-tune",
                                   retry="train")
                ev = ctx.configure(evaluate.evaluate(config=eval_config, data=iprep.outputs["dataset"],
                                                     model=ft.outputs["adapter"], base_model=base, **common),
                                   "evaluate", "Evaluate + gate")
                with dsl.If(ev.outputs["Output"] == True, name="gate-passed"):  # noqa: E712
                    cmp = ctx.configure(evaluate.compare_with_champion(
                        config=eval_config, data=iprep.outputs["dataset"], base_model=base,
                        candidate_results=ev.outputs["results"], **common), "evaluate", "Compare with champion")
                    with dsl.If(cmp.outputs["Output"] == True, name="beats-champion"):  # noqa: E712
                        release(ctx, run_config=run_config, parent=start.output,
                                model=ft.outputs["adapter"], base=base, evaluation=ev.outputs["results"],
                                fingerprint=iprep.outputs["Output"])

    return llm_continuous_finetune
