"""Your own pipeline from kubellm's components: the public API (``kubellm.pipelines.api``).

A :class:`Builder` turns a run config into everything a component needs, checked when the pipeline is
built (compile time), not an hour into a run:

- :meth:`Builder.step` calls a kubellm component with its ``config`` section taken from the run config
  (or from a dict of overrides on it, validated against the section's model), ``tracking``, ``workdir``,
  the parent run, and — for the steps that act beyond their pod — the ``platform`` section; then gives
  the task its display name, retries, caching and, when compiling for a cluster, its Kubernetes
  placement. A misspelt argument or config field, a missing input or a YAML ``null`` is a one-line
  :class:`~kubellm.errors.ConfigError` naming it.
- :meth:`Builder.param` is a config section as a pipeline parameter's default (the Kubeflow UI lets a
  run change it; the component validates it again when it runs).
- :meth:`Builder.tracked` opens the MLflow parent run that every step logs under, and records its final
  state whatever happens.
- :meth:`Builder.place` gives a task of your *own* component the same placement, retries and caching.

A pipeline file is a module with ``build(builder) -> pipeline``; ``kubellm run --pipeline FILE.py`` runs it
on KFP's local runner (live table, task logs, run summary) and ``kubellm compile --pipeline FILE.py``
compiles it for a cluster::

    from kubellm.components import data, evaluate, registry, train
    from kubellm.pipelines.api import Builder, gate_passed

    def build(b: Builder):
        @b.pipeline("my-finetune", "LoRA on my question/answer CSV.")
        def my_finetune(base_model: str = "models:/kubellm-local@champion",
                        questions: str = "data/qa.csv",
                        finetune_config: dict = b.param("finetune", {"optim.lr": 1e-3})):
            with b.tracked():
                base = b.step(train.fetch_model, ref=base_model)
                prep = b.step(data.prepare_instructions, source_uri=questions,
                              tokenizer_from=base.outputs["model"])
                ...

        return my_finetune

``examples/own_data/pipeline.py`` is a complete one on a parquet corpus and a CSV with their own column
names. The built-in pipelines (``lifecycle.py``, ``finetune.py``, ``sweep.py``, ``continuous.py``) are
written with the same calls, and :data:`STEPS` is the one table of every step's display name, placement,
retries, caching and MLflow stage; a new file like them in ``pipelines/`` is a new built-in pipeline.
"""
# No `from __future__ import annotations` (see lifecycle.py): KFP reads pipeline annotations as types.

import contextlib
import importlib.util
import inspect
import json
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import dsl

from kubellm.config import RunConfig
from kubellm.config.params import NULLS, to_param
from kubellm.config.reference import did_you_mean
from kubellm.config.run import apply_overrides, default_config_path, load_config, validate_section
from kubellm.errors import ConfigError
from kubellm.pipeline_params import PARAM_DOCS, builtin, is_pipeline_file
from kubellm.pipelines._common import Context, Target


@dataclass(frozen=True)
class Step:
    """How :meth:`Builder.step` treats one kubellm component."""

    stage: str
    """Placement and retry key (``platform.stages.<stage>``) and the MLflow stage it logs (``logs``)."""
    display_name: str
    """Its name in the Kubeflow UI; a sweep's trial (a step given ``trial``) adds " (trial)"."""
    section: str | None = None
    """The run-config section its ``config`` argument takes (``release``: deploy + serve + playground)."""
    retry: str = "default"
    cache: bool = False
    """A pure step (see ``_common``): cacheable, and it finds the parent run by the KFP run id."""
    logs: str | None = None
    """The MLflow stage run it leaves under the parent run (None: none); a sweep's trial logs
    ``<logs>.<trial>`` (``<logs>.*`` in :attr:`Builder.stages`)."""
    parent_run: bool = False
    """Starts or ends the MLflow parent run: :meth:`Builder.tracked` adds it, never :meth:`Builder.step`."""


#: Every kubellm component, by its function's name, in the order the pipelines run them: the one table
#: of each step's placement key, display name, retries, cacheability and MLflow stage. The built-in
#: pipelines and yours read it through :meth:`Builder.step`; ``_cache`` and ``_runner`` read the stages
#: from it, and ``_runner.COMPONENTS`` (the compiled components, ``docs/components.md``) its order.
STEPS: dict[str, Step] = {
    "start_run": Step("register", "Start MLflow run", parent_run=True),
    "finish_run": Step("register", "Record final status in MLflow", parent_run=True),
    "check_data": Step("prep_instruct", "Data changed since the champion?", "instruct_data", logs="check_data"),
    "prepare_data": Step("prep", "Prepare corpus", "data", cache=True, logs="prep"),
    "prepare_instructions": Step(
        "prep_instruct", "Prepare instructions", "instruct_data", cache=True, logs="prep_instruct"
    ),
    "fetch_model": Step("finetune", "Fetch base model", cache=True),
    "pretrain": Step("pretrain", "Pretrain", "pretrain", retry="train", cache=True, logs="pretrain"),
    "finetune": Step("finetune", "LoRA fine-tune", "finetune", retry="train", cache=True, logs="finetune"),
    "evaluate": Step("evaluate", "Evaluate + gate", "evaluate", cache=True, logs="evaluate"),
    "compare_with_champion": Step("evaluate", "Compare with champion", "evaluate", logs="evaluate_champion"),
    "select_best": Step("evaluate", "Select the best trial"),
    "register": Step("register", "Register model (alias: candidate)", logs="register"),
    "deploy": Step("deploy", "Deploy on KServe (champion when healthy)", "release", retry="deploy", logs="deploy"),
}

#: The arguments the builder fills in when a call leaves them out.
_FILLED = ("config", "eval_config", "tracking", "workdir", "parent_run_id", "platform", "run_name", "target")


def gate_passed(task: Any) -> Any:
    """The condition "this evaluation's promotion gate passed", for ``with dsl.If(...)``."""
    return task.outputs["Output"] == True  # noqa: E712 (a KFP condition, not a Python comparison)


def _function_name(component: Any) -> str:
    func = getattr(component, "python_func", None)
    if func is None:
        raise ConfigError(
            f"{component!r} is not a KFP Python component; call your own component and give "
            "its task placement with Builder.place(task, stage)"
        )
    return func.__name__


def _is_constant(value: Any) -> bool:
    """A value known at compile time (not a pipeline parameter or another task's output)."""
    return not isinstance(value, dsl.pipeline_channel.PipelineChannel)


class Builder:
    """Builds pipelines from kubellm's components with one validated run config (see the module doc)."""

    def __init__(
        self, cfg: RunConfig, target: Target = "local", *, run_id: str | None = None, caching: bool = True
    ) -> None:
        self.ctx = Context(cfg, target, run_id, caching)
        self.name: str | None = None
        self.stages: list[str] = []
        """The MLflow stages the pipeline's steps log, in the order they were added (the run summary's rows)."""
        self._start: Any = None
        self._ordered: set[str] = set()
        """The tasks that run after the parent run has started (the start task and its descendants)."""

    @classmethod
    def load(
        cls,
        config: str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = (),
        target: Target = "local",
        **kwargs: Any,
    ) -> "Builder":
        """A builder for the run config file ``config`` (default: the embedded one) with ``--set``-style
        ``overrides`` (``"finetune.optim.lr=0.001"``), validated now."""
        return cls(load_config(config if config is not None else default_config_path(), overrides), target, **kwargs)

    @property
    def cfg(self) -> RunConfig:
        return self.ctx.cfg

    @property
    def target(self) -> Target:
        return self.ctx.target

    # --- config sections -------------------------------------------------------------------------

    def section(self, name: str, overrides: dict[str, Any] | None = None) -> Any:
        """Run-config section ``name`` (``data``, ``instruct_data``, ``pretrain``, ``finetune``,
        ``evaluate``, ``release``…) with ``overrides`` applied — nested dicts or dotted keys
        (``{"optim.lr": 1e-3, "lora": {"r": 16}}``) — validated: a misspelt field or a bad value is a
        one-line ConfigError naming ``name.field``."""
        if name == "release":
            current: Any = self.cfg.release()
        elif name in RunConfig.model_fields:
            current = getattr(self.cfg, name)
        else:
            raise ConfigError(
                f"no config section {name!r}{did_you_mean(name, ['release', *RunConfig.model_fields]) or ';'}"
                f" expected one of release, {', '.join(RunConfig.model_fields)}"
            )
        if current is None:
            raise ConfigError(f"the run config has no {name} section; add one to the config file")
        if not overrides:
            return current
        doc = current.model_dump(mode="json")
        overrides = dict(overrides)
        nulls = overrides.pop(NULLS, [])  # a parameter dict (Builder.param) lists its None values here
        nested = {k: v for k, v in overrides.items() if "." not in k and "[" not in k}
        _merge(doc, nested)
        dotted = {k: v for k, v in overrides.items() if k not in nested} | dict.fromkeys(nulls)
        for key, value in dotted.items():
            _set_dotted(doc, key, value, name)
        return validate_section(type(current), doc, f"{name} (pipeline overrides)")

    def param(self, name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Section ``name`` (with ``overrides``) as a pipeline parameter's default: validated now, and
        KFP-safe (``None`` values travel as a list of paths, which KFP would refuse as values)."""
        return to_param(self.section(name, overrides))

    # --- the pipeline and its parent run --------------------------------------------------------

    def pipeline(self, name: str, description: str) -> Callable[[Callable[..., None]], Any]:
        """``@dsl.pipeline(name=…, description=…)``, remembering the name for :meth:`tracked` and the run
        summary. Parameters named like the built-in pipelines' get their description in the UI."""

        def wrap(func: Callable[..., None]) -> Any:
            params = [p for p in inspect.signature(func).parameters if p in PARAM_DOCS]
            if params and not func.__doc__:
                func.__doc__ = description + "\n\nArgs:\n" + "".join(f"    {p}: {PARAM_DOCS[p]}\n" for p in params)
            self.name = name
            return dsl.pipeline(name=name, description=description, pipeline_config=self.ctx.pipeline_config())(func)

        return wrap

    @contextlib.contextmanager
    def tracked(self, run_name: Any = None) -> Iterator[Any]:
        """The MLflow parent run around the steps inside the block; its final state (FINISHED, FAILED)
        is recorded by an exit handler even when a step fails. ``run_name``: a pipeline parameter or a
        string; by default ``kubellm run``'s run name locally and the config's ``name`` on a cluster."""
        if self.name is None:
            raise ConfigError(
                "Builder.tracked() is used inside a pipeline function decorated with "
                "@builder.pipeline(name, description)"
            )
        if self._start is not None:
            raise ConfigError(f"{self.name}: one tracked block per pipeline")
        if run_name is None:
            run_name = self.ctx.run_id or self.cfg.name
        from kubellm.components import tracking

        ids = {
            "pipeline_name": self.name,
            "run_name": run_name,
            "kfp_run_id": self.ctx.run_id or dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        }
        finish = self._parent_run_step(tracking.finish_run, **ids)
        with dsl.ExitHandler(finish, name=self.name.removeprefix("llm-")):
            start = self._parent_run_step(tracking.start_run, run_config=to_param(self.cfg), **ids)
            self._start, self._ordered = start, {start.name}
            try:
                yield start
            finally:
                self._start = None

    def _parent_run_step(self, component: Any, **arguments: Any) -> Any:
        spec = STEPS[_function_name(component)]
        task = component(tracking=self.ctx.tracking, workdir=self.ctx.workdir, **arguments)
        return self._configure(task, spec.stage, spec.display_name, spec.retry, cache=spec.cache)

    # --- steps ------------------------------------------------------------------------------------

    def step(
        self,
        component: Any,
        display_name: str | None = None,
        *,
        cache: bool | None = None,
        placement: str | None = None,
        **arguments: Any,
    ) -> Any:
        """A task of ``component`` with the arguments it needs from the run config filled in.

        ``config`` (and ``eval_config`` of ``deploy``): left out → the config file's section; a dict →
        overrides on that section, validated now; a pipeline parameter → passed as is. ``tracking``,
        ``workdir``, ``parent_run_id``, ``platform``, ``run_name`` and ``target`` are filled in unless
        given. ``cache`` overrides whether a pure step may be reused (``kubellm run --resume``, KFP's cache).
        ``trial`` (``finetune``, ``evaluate``: a ``dsl.ParallelFor`` item) makes the task one trial of a
        sweep: " (trial)" in its display name, its stage logged per trial (``finetune.*`` in :attr:`stages`).

        A step that logs under the parent run without taking it as an input (a pure step finds it by the
        KFP run id) is ordered after the parent run's start, unless one of its inputs already comes from
        a task that is.

        Your own component (made with :func:`component`) is a step too: ``placement`` names the
        ``platform.stages`` entry it runs with; it gets the same filled-in arguments it declares (with
        ``tracking``, ``workdir`` and ``parent_run_id`` it can open its own nested MLflow run:
        ``StageContext.from_param(tracking, workdir, parent_run_id).stage("<its function name>")``), and
        a row in the run summary under its function's name.
        """
        fname = _function_name(component)
        if fname not in STEPS:
            if placement is None:
                raise ConfigError(
                    f"{fname} is not a kubellm component: say where your own step runs with "
                    f"placement=STAGE (a platform.stages key, e.g. evaluate)"
                )
            spec = Step(placement, display_name or fname.replace("_", " ").capitalize(), logs=fname)
        elif placement is not None:
            raise ConfigError(
                f"step {fname}: a kubellm component's placement is its own "
                f"({STEPS[fname].stage}); set platform.stages.{STEPS[fname].stage} instead"
            )
        elif STEPS[fname].parent_run:
            raise ConfigError(
                f"step {fname}: Builder.tracked() adds the MLflow parent run's start and end; "
                "put your steps inside `with builder.tracked():`"
            )
        else:
            spec = STEPS[fname]
        params = inspect.signature(component.python_func).parameters
        inputs = [p for p, v in params.items() if not _is_output(v.annotation)]
        unknown = sorted(set(arguments) - set(inputs))
        if unknown:
            hint = did_you_mean(unknown[0], inputs) if len(unknown) == 1 else ""
            raise ConfigError(
                f"step {fname}: no argument {', '.join(unknown)}{hint or ';'} its arguments are {', '.join(inputs)}"
            )
        args = dict(arguments)
        if "config" in params and fname in STEPS:
            args["config"] = self._config_arg(fname, spec.section, args.get("config"))
        if "eval_config" in params and fname in STEPS:
            args["eval_config"] = self._config_arg(fname, "evaluate", args.get("eval_config"))
        filled: dict[str, Any] = {
            "tracking": self.ctx.tracking,
            "workdir": self.ctx.workdir,
            "target": self.target,
            **self.ctx.placed(),
        }
        if "parent_run_id" in params and "parent_run_id" not in args:
            if self._start is None:
                raise ConfigError(
                    f"step {fname} logs under the pipeline's MLflow parent run: add it inside `with builder.tracked():`"
                )
            filled["parent_run_id"] = self._start.output
        for key, value in filled.items():
            if key in params and key not in args:
                args[key] = value
        missing = [p for p in inputs if p not in args and params[p].default is inspect.Parameter.empty]
        if missing:
            raise ConfigError(
                f"step {fname}: missing {', '.join(missing)} (its inputs: "
                f"{', '.join(p for p in inputs if p not in _FILLED)})"
            )
        task = component(**args)
        if (
            spec.logs
            and self._start is not None
            and "tracking" in params
            and "parent_run_id" not in params
            and not self._runs_after_start(task)
        ):
            task.after(self._start)  # it finds the parent run by run id: the run must exist first
        self._note_order(task)
        trial = args.get("trial") is not None
        logs = f"{spec.logs}.*" if trial and spec.logs else spec.logs
        if logs and logs not in self.stages:
            self.stages.append(logs)
        name = display_name or (f"{spec.display_name} (trial)" if trial else spec.display_name)
        return self._configure(task, spec.stage, name, spec.retry, cache=spec.cache if cache is None else cache)

    def _runs_after_start(self, task: Any) -> bool:
        """Whether ``task`` waits for the parent run's start: an input of it comes from a task that does."""
        return any(getattr(c, "task_name", None) in self._ordered for c in task.channel_inputs)

    def _note_order(self, task: Any) -> None:
        if self._start is not None and (self._start.name in task.dependent_tasks or self._runs_after_start(task)):
            self._ordered.add(task.name)

    def _configure(self, task: Any, stage: str, display_name: str, retry: str, *, cache: bool) -> Any:
        if self.target == "cluster":
            _refuse_installs(task)
        return self.ctx.configure(task, stage, display_name, retry, cache=cache)

    def _config_arg(self, fname: str, section: str | None, value: Any) -> Any:
        if value is not None and not _is_constant(value):
            return value  # a pipeline parameter: the component validates it when it runs
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"step {fname}: config must be a dict of overrides on the {section} section "
                f"or a pipeline parameter, not {type(value).__name__}"
            )
        return self.param(section or "", value)

    def place(self, task: Any, stage: str, display_name: str, *, retry: str = "default", cache: bool = False) -> Any:
        """Display name, retries (``default``, ``train`` or ``deploy``), caching and — on a cluster —
        the ``platform.stages.<stage>`` placement (image, resources, node selector, tolerations, PVCs,
        secrets, security context) for a task of your own component."""
        if retry not in ("default", "train", "deploy"):
            raise ConfigError(f"retry {retry!r}: expected default, train or deploy")
        row = task.component_spec.name.replace("-", "_")
        if row not in self.stages:
            self.stages.append(row)  # its row in the run summary
        self._note_order(task)
        return self._configure(task, stage, display_name, retry, cache=cache)

    def compile(self, pipeline: Any, path: str | Path) -> Path:
        """Compile ``pipeline`` to ``path`` (deterministic bytes for the same config)."""
        from kubellm.pipelines._runner import compile_pipeline

        return compile_pipeline(pipeline, Path(path))


def component(func: Callable[..., Any] | None = None, *, packages: tuple[str, ...] | list[str] = ()) -> Any:
    """``@component`` for a step of your own: a KFP lightweight component on kubellm's runtime image with
    nothing installed when its pod starts (pods run with a read-only root filesystem, often without a
    package index). ``packages``: what the step imports beyond the standard library, each checked now to
    be installed beside kubellm (the runtime image is built from the same pinned stack); one that is not
    is a one-line ConfigError, and needs an image of your own (``platform.image``)."""

    def wrap(f: Callable[..., Any]) -> Any:
        missing = [p for p in packages if not _installed(p)]
        if missing:
            raise ConfigError(
                f"component {f.__name__}: {', '.join(missing)} not installed beside kubellm, so "
                "not in its runtime image: install it here and build an image from kubellm's "
                "(platform.image), or drop the import"
            )
        from kubellm.components._base import component as kubellm_component

        return kubellm_component(f)

    return wrap(func) if func is not None else wrap


def _installed(requirement: str) -> bool:
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        raise ConfigError(f"packages: {requirement!r} is not a requirement (name[==version])") from None
    try:
        return req.specifier.contains(metadata.version(req.name), prereleases=True)
    except metadata.PackageNotFoundError:
        return False


def _refuse_installs(task: Any) -> None:
    """A task whose component pip-installs when its pod starts cannot run on kubellm's pods (read-only
    root filesystem): refused when compiling for a cluster, in one line."""
    container = task.component_spec.implementation.container
    command = " ".join([*(container.command or []), *(container.args or [])])
    if "pip install" in command:
        raise ConfigError(
            f"step {task.component_spec.name}: its component installs packages when its pod "
            "starts (a plain @dsl.component), which kubellm's read-only pods cannot do: decorate "
            "it with kubellm.pipelines.api.component (packages=[...] to check what it imports)"
        )


#: The marker ``dsl.Output[...]`` puts in its ``Annotated`` metadata, found through the public ``dsl.Output``.
_OUTPUT_MARKER = typing.get_args(dsl.Output[dsl.Artifact])[1]


def _is_output(annotation: Any) -> bool:
    """An output artifact, or the exit handler's status: the runtime supplies both, never the caller."""
    if annotation is dsl.PipelineTaskFinalStatus:
        return True
    return typing.get_origin(annotation) is typing.Annotated and _OUTPUT_MARKER in typing.get_args(annotation)[1:]


def _merge(doc: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            _merge(doc[key], value)
        else:
            doc[key] = value


def _set_dotted(doc: dict[str, Any], key: str, value: Any, section: str) -> None:
    """One dotted override, with ``--set``'s own path rules (``[N]`` and ``.N`` list indices); the value
    travels as JSON, which ``--set`` parses as YAML."""
    apply_overrides(doc, [f"{key}={json.dumps(value)}"], origin=f"{section} override")


# --- pipeline files -------------------------------------------------------------------------------


def pipeline_loader(ref: str) -> Callable[[Builder], Any]:
    """The function that makes pipeline ``ref`` from a builder: a built-in pipeline's name (its module's
    ``build``) or a pipeline file ``FILE.py[:FUNC]`` (``build`` by default), the file executed once.
    Calling it checks that a pipeline came back (a built-in's named its ``NAME``)."""
    with warnings.catch_warnings():
        # kfp's notice that its default base image changes in 2027: noise for a step placed on kubellm's image
        warnings.filterwarnings("ignore", category=FutureWarning, message="The default base_image")
        name: str | None = None  # a built-in's: its NAME
        if is_pipeline_file(ref):
            func, func_name = _file_function(ref), ref.partition(":")[2] or "build"
        else:
            found = builtin(ref)
            name, func_name = found.name, "build"
            func = importlib.import_module(found.module).build

    def make(builder: Builder) -> Any:
        pipeline = func(builder)
        if builder.name is None or not hasattr(pipeline, "pipeline_spec"):
            raise ConfigError(
                f"--pipeline {ref}: {func_name}(builder) must return a pipeline made with "
                "@builder.pipeline(name, description)"
            )
        if name is not None and builder.name != name:
            raise ConfigError(
                f"pipeline {name}: its module's build() names its pipeline {builder.name!r}; "
                "decorate it with @b.pipeline(NAME, description)"
            )
        return pipeline

    return make


def _file_function(ref: str) -> Callable[[Builder], Any]:
    """Function ``FUNC`` of pipeline file ``FILE.py[:FUNC]``, the file executed as a module of its own."""
    path_str, _, func_name = ref.partition(":")
    func_name = func_name or "build"
    path = Path(path_str)
    if not path.is_file():
        raise ConfigError(f"--pipeline {ref}: no such file")
    mod_name = f"kubellm_user_pipeline_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"--pipeline {ref}: {path} defines no function {func_name}(builder)")
    return func


def load_file(ref: str, builder: Builder) -> Any:
    """The pipeline that ``ref`` (a pipeline file, or a built-in pipeline's name) makes with ``builder``."""
    return pipeline_loader(ref)(builder)


def pipeline_parameters(pipeline: Any) -> dict[str, Any]:
    """The run parameters of a built pipeline with their defaults (None: none), in its signature's order."""
    return {
        name: None if p.default is inspect.Parameter.empty else p.default
        for name, p in inspect.signature(pipeline.pipeline_func).parameters.items()
    }
