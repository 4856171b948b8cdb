"""``llm-lora-sweep``: several LoRA fine-tunes at once; the best one that passes the gate is released."""


from typing import Any

from kfp import dsl

from kubellm import stages
from kubellm.components import evaluate, tracking, train
from kubellm.config.params import to_param
from kubellm.pipelines._common import Context, require
from kubellm.pipelines.finetune import base_model_default, start_run, prepare_base_and_data
from kubellm.pipelines.lifecycle import release

NAME = "llm-lora-sweep"


def build(ctx: Context) -> Any:
    cfg = require(ctx.cfg, "instruct_data", "finetune")
    default_base = base_model_default(ctx)

    @dsl.pipeline(name=NAME, description="Several LoRA fine-tunes of one base model in parallel (one pod "
                  "each), every one evaluated and gated; the best by the sweep's metric is registered and "
                  "deployed.")
    def llm_lora_sweep(
        run_name: str = cfg.name,
        base_model: str = default_base,
        instruct_dataset_uri: str = cfg.instruct_data.sources[0].uri,
        trials: list = stages.sweep_trials(cfg),
        metric: str = cfg.sweep.metric,
        mode: str = cfg.sweep.mode,
        run_config: dict = to_param(cfg),
        instruct_data_config: dict = to_param(cfg.instruct_data),
        finetune_config: dict = to_param(cfg.finetune),
        eval_config: dict = to_param(cfg.evaluate),
    ) -> None:
        """Fine-tune several variants at once and release the best.

        Args:
            run_name: Name of the MLflow parent run.
            base_model: Model to adapt: a model directory, models:/name@alias, or a Hugging Face Hub id.
            instruct_dataset_uri: Instruction data (a path, glob, hf://owner/name, s3://… or builtin://stdlib-instruct).
            trials: One item per fine-tune: {"name": "trial-1", "overrides": {"lora.r": 16, "optim.lr": 0.0005}}.
            metric: Evaluation metric that ranks the trials that passed the gate.
            mode: "min" (lower is better, e.g. perplexity) or "max" (e.g. rouge_l).
            run_config: The full run config (deploy, serve and platform sections), as validated by kubellm.
            instruct_data_config: Data preparation settings of the instruction data (kubellm DataConfig).
            finetune_config: LoRA settings, optimizer and loop shared by every trial (kubellm FinetuneConfig).
            eval_config: Evaluation settings and the promotion gate (kubellm EvalConfig).
        """
        ids = {"pipeline_name": NAME, "run_name": run_name, "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        exit_task = ctx.configure(tracking.finish_run(tracking=ctx.tracking, workdir=ctx.workdir, **ids),
                                  "register", "Record final status in MLflow")
        with dsl.ExitHandler(exit_task, name="sweep"):
            start = start_run(ctx, ids, run_config)
            head = prepare_base_and_data(ctx, start=start, base_model=base_model, instruct_dataset_uri=instruct_dataset_uri,
                                 instruct_data_config=instruct_data_config)
            common, base, iprep = head["common"], head["base"].outputs["model"], head["iprep"]
            # Inside the loop the parent run is found by KFP run id, not passed: KFP's local runner
            # replaces task-output parameters that enter a ParallelFor with the loop item.
            loop = {**common, "parent_run_id": "", "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
            with dsl.ParallelFor(trials, name="trials") as trial:
                ft = ctx.configure(train.finetune(config=finetune_config, run_config=run_config, data=iprep.outputs["dataset"],
                                                  base_model=base, trial=trial, **loop),
                                   "finetune", "LoRA fine-tune (trial)", retry="train")
                ev = ctx.configure(evaluate.evaluate(config=eval_config, data=iprep.outputs["dataset"],
                                                     model=ft.outputs["adapter"], base_model=base, trial=trial,
                                                     **loop),
                                   "evaluate", "Evaluate + gate (trial)")
            best = ctx.configure(evaluate.select_best(evaluations=dsl.Collected(ev.outputs["results"]),
                                                      adapters=dsl.Collected(ft.outputs["adapter"]),
                                                      metric=metric, mode=mode),
                                 "evaluate", "Select the best trial")
            with dsl.If(best.outputs["Output"] == True, name="some-trial-passed"):  # noqa: E712 (a KFP condition)
                release(ctx, run_config=run_config, parent=start.output, model=best.outputs["best_adapter"],
                        base=base, evaluation=best.outputs["best_evaluation"], fingerprint=iprep.outputs["Output"])

    return llm_lora_sweep
