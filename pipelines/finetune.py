"""``llm-finetune``: an existing base model → prep → LoRA → evaluate → gate → register → deploy."""


from typing import Any

from kfp import dsl

from kubellm.components import data, evaluate, tracking, train
from kubellm.config.params import to_param
from kubellm.pipelines._common import Context, require
from kubellm.pipelines.lifecycle import release

NAME = "llm-finetune"


def base_model_default(ctx: Context) -> str | None:
    """The UI default of ``base_model``: ``finetune.base_model``, or none (a required run parameter)."""
    return ctx.cfg.finetune.base_model


def start_run(ctx: Context, ids: dict, run_config: Any) -> Any:
    return ctx.configure(tracking.start_run(run_config=run_config, tracking=ctx.tracking, workdir=ctx.workdir,
                                            **ids), "register", "Start MLflow run")


def prepare_base_and_data(ctx: Context, *, start: Any, base_model: str, instruct_dataset_uri: str,
                  instruct_data_config: Any) -> dict[str, Any]:
    """fetch base → prep instructions with its tokenizer: the head shared by the fine-tuning pipelines."""
    common = {"tracking": ctx.tracking, "workdir": ctx.workdir, "parent_run_id": start.output}
    base = ctx.configure(train.fetch_model(ref=base_model, tracking=ctx.tracking, workdir=ctx.workdir),
                         "finetune", "Fetch base model")
    iprep = ctx.configure(data.prepare_instructions(config=instruct_data_config, source_uri=instruct_dataset_uri,
                                                    tokenizer_from=base.outputs["model"], **common),
                          "prep_instruct", "Prepare instructions")
    return {"common": common, "base": base, "iprep": iprep}


def build(ctx: Context) -> Any:
    cfg = require(ctx.cfg, "instruct_data", "finetune")
    default_base = base_model_default(ctx)

    @dsl.pipeline(name=NAME, description="LoRA fine-tune an existing model on instruction data, evaluate it "
                  "against the base model, and register + deploy it when the promotion gate passes.")
    def llm_finetune(
        run_name: str = cfg.name,
        base_model: str = default_base,
        instruct_dataset_uri: str = cfg.instruct_data.sources[0].uri,
        run_config: dict = to_param(cfg),
        instruct_data_config: dict = to_param(cfg.instruct_data),
        finetune_config: dict = to_param(cfg.finetune),
        eval_config: dict = to_param(cfg.evaluate),
    ) -> None:
        """Fine-tune, evaluate, gate, release.

        Args:
            run_name: Name of the MLflow parent run.
            base_model: Model to adapt: a model directory, models:/name@alias, or a Hugging Face Hub id.
            instruct_dataset_uri: Instruction data (a path, glob, hf://owner/name, s3://… or builtin://stdlib-instruct).
            run_config: The full run config (deploy, serve and platform sections), as validated by kubellm.
            instruct_data_config: Data preparation settings of the instruction data (kubellm DataConfig).
            finetune_config: LoRA settings, optimizer and loop (kubellm FinetuneConfig).
            eval_config: Evaluation settings and the promotion gate (kubellm EvalConfig).
        """
        ids = {"pipeline_name": NAME, "run_name": run_name, "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        exit_task = ctx.configure(tracking.finish_run(tracking=ctx.tracking, workdir=ctx.workdir, **ids),
                                  "register", "Record final status in MLflow")
        with dsl.ExitHandler(exit_task, name="finetune"):
            start = start_run(ctx, ids, run_config)
            head = prepare_base_and_data(ctx, start=start, base_model=base_model, instruct_dataset_uri=instruct_dataset_uri,
                                 instruct_data_config=instruct_data_config)
            common, base, iprep = head["common"], head["base"].outputs["model"], head["iprep"]
            ft = ctx.configure(train.finetune(config=finetune_config, run_config=run_config, data=iprep.outputs["dataset"],
                                              base_model=base, **common), "finetune", "LoRA fine-tune", retry="train")
            ev = ctx.configure(evaluate.evaluate(config=eval_config, data=iprep.outputs["dataset"],
                                                 model=ft.outputs["adapter"], base_model=base, **common),
                               "evaluate", "Evaluate + gate")
            with dsl.If(ev.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
                release(ctx, run_config=run_config, parent=start.output, model=ft.outputs["adapter"],
                        base=base, evaluation=ev.outputs["results"], fingerprint=iprep.outputs["Output"])

    return llm_finetune
