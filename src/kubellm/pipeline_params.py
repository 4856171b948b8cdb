"""The run parameters each pipeline offers, with their meaning — plain data, no kfp.

The Kubeflow UI shows these descriptions beside each run parameter (``pipelines/_common.py`` puts them in
the pipeline's docstring), and ``kubellm run --help`` lists them without importing kfp (~2.5 s). A
pipeline test checks that :data:`PIPELINE_PARAMS` names exactly each pipeline function's parameters.
"""

from __future__ import annotations

PARAM_DOCS = {
    "run_name": "Name of the MLflow parent run.",
    "base_model": "Model to adapt: a model directory, models:/name@alias, or a Hugging Face Hub id.",
    "dataset_uri": "Pretraining corpus: a path or glob, hf://owner/name, s3://…, gs://…, https://… or builtin://stdlib.",
    "instruct_dataset_uri": "Instruction data: a path or glob, hf://owner/name, s3://… or builtin://stdlib-instruct.",
    "trials": 'One item per fine-tune: {"name": "trial-1", "overrides": {"lora.r": 16, "optim.lr": 0.0005}}.',
    "metric": "Evaluation metric that ranks the trials that passed the gate.",
    "mode": '"min" (lower is better, e.g. perplexity) or "max" (e.g. rouge_l).',
    "deploy_config": "Rollout, predictor and playground settings (kubellm ReleaseConfig: deploy, serve, playground).",
    "data_config": "Data preparation of the pretraining corpus (kubellm DataConfig).",
    "instruct_data_config": "Data preparation of the instruction data (kubellm DataConfig, kind instruct).",
    "pretrain_config": "Model size, optimizer and training loop (kubellm PretrainConfig).",
    "finetune_config": "LoRA settings, optimizer and training loop (kubellm FinetuneConfig).",
    "eval_config": "Evaluation settings and the promotion gate (kubellm EvalConfig).",
}

_FINETUNE = ["run_name", "base_model", "instruct_dataset_uri", "deploy_config", "instruct_data_config",
             "finetune_config", "eval_config"]

#: Each pipeline's run parameters, in its signature's order.
PIPELINE_PARAMS: dict[str, list[str]] = {
    "llm-lifecycle": ["run_name", "dataset_uri", "instruct_dataset_uri", "deploy_config", "data_config",
                      "instruct_data_config", "pretrain_config", "finetune_config", "eval_config"],
    "llm-finetune": _FINETUNE,
    "llm-lora-sweep": [*_FINETUNE[:3], "trials", "metric", "mode", *_FINETUNE[3:]],
    "llm-continuous-finetune": _FINETUNE,
}


def is_pipeline_file(ref: str) -> bool:
    """``--pipeline`` names a user's pipeline file (``FILE.py`` or ``FILE.py:FUNC``; see
    ``kubellm.pipelines.api``), not a built-in pipeline."""
    return ref.split(":", 1)[0].endswith(".py")


def unknown_params(pipeline: str, names: list[str], valid: list[str] | None = None) -> str | None:
    """One line naming the parameters ``pipeline`` does not have and those it has; None when all exist.
    ``valid``: a pipeline's own parameters (a pipeline file's); by default the built-in's."""
    builtin = valid is None
    valid = PIPELINE_PARAMS[pipeline] if valid is None else valid
    bad = sorted(n for n in names if n not in valid)
    if not bad:
        return None
    from kubellm.config.reference import did_you_mean

    hint = did_you_mean(bad[0], valid) if len(bad) == 1 else ""
    return (f"--param {', '.join(bad)}: {pipeline} has no such parameter{hint or ';'} its parameters are "
            f"{', '.join(valid)}" + (" (kubellm run --help says what each means)" if builtin else ""))


def help_text() -> str:
    """Every pipeline with its parameters, then what each parameter means (for ``kubellm run --help``)."""
    lines = ["Pipelines and their --param names:"]
    lines += [f"  {name}: {', '.join(params)}" for name, params in PIPELINE_PARAMS.items()]
    lines += ["Parameters:"]
    lines += [f"  {name}: {doc}" for name, doc in PARAM_DOCS.items()]
    return "\n\n".join(lines)  # one paragraph each: the help formatter rewraps lines within a paragraph
