"""The built-in pipelines and their run parameters, with their meaning — read without kfp.

The Kubeflow UI shows these descriptions beside each run parameter (``Builder.pipeline`` puts them in
the pipeline's docstring), and ``kubellm run --help`` lists the pipelines and their parameters without
importing kfp (~2.5 s): :func:`builtin_pipelines` reads them from the pipeline files with ``ast``. A
pipeline test checks that it names exactly each compiled pipeline's parameters.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from kubellm.errors import ConfigError

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


@dataclass(frozen=True)
class BuiltIn:
    """A built-in pipeline as its file declares it."""

    name: str
    """Its ``NAME``."""
    module: str
    """The module that builds it (``kubellm.pipelines.lifecycle``)."""
    params: list[str] | None
    """Its run parameters, in its pipeline function's order; None when ``build`` does not itself decorate
    the pipeline function (then known once it is built)."""


def builtin_pipelines() -> dict[str, BuiltIn]:
    """Every built-in pipeline, by name: each public module of the ``kubellm.pipelines`` package (in every
    folder of its ``__path__``) that defines ``NAME`` and ``build(b)``, its parameters those of the function
    that ``build`` decorates with ``@b.pipeline``. Read from the files, not imported: building a pipeline
    imports kfp (~2.5 s), which ``kubellm run --help`` and its parameter check do without."""
    found: dict[str, BuiltIn] = {}
    seen: set[str] = set()
    for folder in _package_path("kubellm.pipelines"):
        for path in sorted(Path(folder).glob("*.py")):
            if path.stem.startswith("_") or path.stem in seen:
                continue
            seen.add(path.stem)  # the first folder's module is the one `import` finds
            declared = _declared(path)
            if declared is not None:
                name, params = declared
                found.setdefault(name, BuiltIn(name, f"kubellm.pipelines.{path.stem}", params))
    return dict(sorted(found.items()))


def _package_path(package: str) -> list[str]:
    """The package's ``__path__`` when it is imported (a program may have extended it), else where its
    import would look, found without importing it."""
    module = sys.modules.get(package)
    if module is not None:
        return list(module.__path__)
    spec = importlib.util.find_spec(package)
    return list(spec.submodule_search_locations or []) if spec is not None else []


def _declared(path: Path) -> tuple[str, list[str] | None] | None:
    """(``NAME``, the pipeline function's parameters) of a pipeline module; None for another module."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except SyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: {err.msg}") from None
    name = build = None
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["NAME"]
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            name = node.value.value
        elif isinstance(node, ast.FunctionDef) and node.name == "build":
            build = node
    if name is None or build is None:
        return None
    for node in ast.walk(build):
        if isinstance(node, ast.FunctionDef) and any(
            isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "pipeline"
            for d in node.decorator_list
        ):
            return name, [a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]]
    return name, None


def builtin(name: str) -> BuiltIn:
    """Built-in pipeline ``name``; an unknown name is one line naming those there are."""
    found = builtin_pipelines()
    if name not in found:
        raise ConfigError(f"unknown pipeline {name!r}; expected one of {', '.join(found)} or a pipeline file (FILE.py)")
    return found[name]


def is_pipeline_file(ref: str) -> bool:
    """``--pipeline`` names a user's pipeline file (``FILE.py`` or ``FILE.py:FUNC``; see
    ``kubellm.pipelines.api``), not a built-in pipeline."""
    return ref.split(":", 1)[0].endswith(".py")


def unknown_params(pipeline: str, names: list[str], valid: list[str] | None = None) -> str | None:
    """One line naming the parameters ``pipeline`` does not have and those it has; None when all exist.
    ``valid``: a pipeline's own parameters (a pipeline file's); by default the built-in's (None when its
    file does not say them: checked once it is built)."""
    builtin = valid is None
    valid = builtin_pipelines()[pipeline].params if valid is None else valid
    if valid is None:
        return None
    bad = sorted(n for n in names if n not in valid)
    if not bad:
        return None
    from kubellm.config.reference import did_you_mean

    hint = did_you_mean(bad[0], valid) if len(bad) == 1 else ""
    return (
        f"--param {', '.join(bad)}: {pipeline} has no such parameter{hint or ';'} its parameters are "
        f"{', '.join(valid)}" + (" (kubellm run --help says what each means)" if builtin else "")
    )


def help_text() -> str:
    """Every pipeline with its parameters, then what each parameter means (for ``kubellm run --help``)."""
    lines = ["Pipelines and their --param names:"]
    try:
        found = builtin_pipelines()
    except ConfigError as err:  # every command builds this help: a broken pipeline file must not stop them
        found, lines = {}, [*lines, f"  (none listed: {err})"]
    lines += [
        f"  {name}: {', '.join(p.params) if p.params is not None else '(set in its build())'}"
        for name, p in found.items()
    ]
    lines += ["Parameters:"]
    lines += [f"  {name}: {doc}" for name, doc in PARAM_DOCS.items()]
    return "\n\n".join(lines)  # one paragraph each: the help formatter rewraps lines within a paragraph
