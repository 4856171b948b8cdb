"""Compile pipelines and components to YAML, and run a pipeline on KFP's local runner.

Used by ``kubellm compile`` and ``kubellm run``; lives beside the pipelines because it imports kfp.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import pkgutil
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from kfp import compiler, local
from kfp.components import BaseComponent

from kubellm import components as components_package
from kubellm import yamlio
from kubellm.config import RunConfig
from kubellm.pipeline_params import builtin_pipelines
from kubellm.pipelines._cache import ResumeCache
from kubellm.pipelines._console import Mode, Monitor
from kubellm.pipelines._kfp_local import cache_installed
from kubellm.pipelines.api import STEPS, Builder, load_file
from kubellm.stages import KFP_RUN_ENV


def _components() -> dict[str, Any]:
    """Every component of ``kubellm.components``, by the file name its YAML gets under ``dist/components/``
    (``prepare-data``), in the order of the step table (``api.STEPS``); one it lacks comes last (and a
    test fails: every component is a step)."""
    found: dict[str, Any] = {}
    for module in pkgutil.iter_modules(components_package.__path__):
        if not module.name.startswith("_"):
            mod = importlib.import_module(f"{components_package.__name__}.{module.name}")
            found |= {
                c.python_func.__name__: c
                for c in vars(mod).values()
                if isinstance(c, BaseComponent) and hasattr(c, "python_func")
            }
    order = [*STEPS, *sorted(set(found) - set(STEPS))]
    return {name.replace("_", "-"): found[name] for name in order if name in found}


#: Every component, by the file name its YAML gets under ``dist/components/``.
COMPONENTS = _components()


_DEFAULT_COMMENT = re.compile(r"^(#\s+\w+: (?:dict|list) \[Default: )(.*)(\])$")


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _stable_header(path: Path) -> None:
    """Sort the dict defaults in the compiled file's header comment.

    KFP renders them from protobuf maps whose iteration order changes from process to process (the
    YAML body is sorted; only this comment is not), which would make `make compile` differ between two
    runs for no reason.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        m = _DEFAULT_COMMENT.match(line)
        if m:
            lines[i] = f"{m.group(1)}{_sorted(ast.literal_eval(m.group(2)))!r}{m.group(3)}"
    path.write_text("\n".join(lines), encoding="utf-8")


def _check_yaml(path: Path) -> None:
    """A compiled file must parse back as YAML documents with a pipeline spec."""
    docs = yamlio.load_all(path.read_text(encoding="utf-8"))
    if not docs or "pipelineInfo" not in docs[0] or "root" not in docs[0]:
        raise RuntimeError(f"{path}: compiled output is not a KFP pipeline spec")


def build_for_cluster(cfg: RunConfig, names: list[str] | None = None, *, caching: bool = True) -> list[tuple[str, Any]]:
    """(file name, pipeline) of each pipeline ``names`` (built-in names or pipeline files; default every
    built-in) built for a cluster: everything that can fail on the config, before any file is written."""
    built = []
    for name in names if names is not None else builtin_pipelines():
        builder = Builder(cfg, "cluster", caching=caching)
        pipeline = load_file(name, builder)
        built.append((f"{builder.name}.yaml", pipeline))
    return built


def compile_all(
    cfg: RunConfig,
    out_dir: str | Path,
    names: list[str] | None = None,
    *,
    components: bool = True,
    caching: bool = True,
    built: list[tuple[str, Any]] | None = None,
) -> list[Path]:
    """Compile the pipelines (for a cluster, with ``cfg``'s placement; ``built``: those of
    :func:`build_for_cluster`) and every component to ``out_dir`` (``<name>.yaml`` and
    ``components/<name>.yaml``). Deterministic: the same config gives the same bytes. ``caching=False``
    compiles every step uncached."""
    pipelines = built if built is not None else build_for_cluster(cfg, names, caching=caching)
    out = Path(out_dir)
    (out / "components").mkdir(parents=True, exist_ok=True)
    written = [compile_pipeline(pipeline, out / file) for file, pipeline in pipelines]
    for name, comp in sorted(COMPONENTS.items()) if components else ():
        path = out / "components" / f"{name}.yaml"
        compiler.Compiler().compile(comp, str(path))
        _stable_header(path)
        written.append(path)
    return written


def compile_pipeline(pipeline: Any, path: Path) -> Path:
    """Compile one pipeline to ``path``: stable bytes, checked to parse back as a pipeline spec."""
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(path))
    _stable_header(path)
    _check_yaml(path)
    return path


@dataclass
class LocalRun:
    """What a local run did, beyond what MLflow records: its wall time, the stages it reused from an
    earlier run (stage → that run), and where each task's log is."""

    wall_seconds: float
    cached: dict[str, str]
    logs: Path
    failed: list[dict[str, Any]]
    """Each failed task: its name, log file and last lines."""
    tasks: dict[str, str]
    """Each task that started: done, FAILED or cached (RUN)."""


#: The MLflow stage a task logs, where its name differs (``prepare-data`` of the lifecycle logs ``prep``).
TASK_STAGE = {fname.replace("_", "-"): step.logs for fname, step in STEPS.items() if step.logs}


def task_stage(label: str) -> str:
    """``prepare-instructions`` → ``prep_instruct``; ``deploy`` → ``deploy`` (``#2``: a loop's later task)."""
    name = label.split("#")[0]
    return TASK_STAGE.get(name, name.replace("-", "_"))


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


class TaskEnvironment(Protocol):
    """What a KFP backend adds to a task's container at run time, per task: KFP's MLflow plugin sets
    ``MLFLOW_RUN_ID`` (the task's own nested run) and the server's settings. The local runner has no
    backend; a stand-in for one (the tests' stand-in for the plugin) is registered in
    :data:`TASK_ENVIRONMENTS`."""

    def start(self, task: str) -> Mapping[str, str]:
        """The variables task ``task`` (its label: ``evaluate``, ``evaluate#2``) gets as it starts."""

    def end(self, task: str, ok: bool) -> None:
        """Task ``task`` ended (``ok``: it succeeded)."""


#: Per-task environments every local run applies (see :class:`TaskEnvironment`); empty by default.
TASK_ENVIRONMENTS: list[TaskEnvironment] = []


class _Combined:
    def __init__(self, parts: list[TaskEnvironment]) -> None:
        self.parts = parts

    def start(self, task: str) -> Mapping[str, str]:
        env: dict[str, str] = {}
        for part in self.parts:
            env.update(part.start(task))
        return env

    def end(self, task: str, ok: bool) -> None:
        for part in self.parts:
            part.end(task, ok)


def run_pipeline(
    pipeline: Any,
    *,
    params: dict[str, Any],
    run_id: str,
    runs_dir: str | Path,
    pipeline_root: str | Path,
    resume: str | None = None,
    output: Mode = "lines",
    out: TextIO | None = None,
) -> LocalRun:
    """Run a pipeline function on KFP's local runner as run ``run_id`` (its folder under ``runs_dir``).

    The tasks find the MLflow parent run by ``run_id`` (:data:`~kubellm.stages.KFP_RUN_ENV`). Every
    cacheable task's outputs are indexed under the run's folder; with ``resume`` the cacheable tasks whose
    key that earlier run holds are not run again (:mod:`._cache`). ``output`` is what the console shows
    (:mod:`._console`); each task's log is written under the run's ``logs/`` whatever it is.
    """
    run_dir = Path(runs_dir) / run_id
    cache = ResumeCache(runs_dir, run_id, resume)
    Path(pipeline_root).mkdir(parents=True, exist_ok=True)
    # "custom base image in a Python environment" and "display_name has no effect locally": both true
    # and both expected here (the image is this environment; display names are for the Kubeflow UI).
    warnings.filterwarnings("ignore", module=r"kfp\.local")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=False,
        enable_caching=True,
    )
    monitor = Monitor(run_dir / "logs", output, out)
    t0 = time.perf_counter()
    task_env = _Combined(list(TASK_ENVIRONMENTS)) if TASK_ENVIRONMENTS else None
    with _env(KFP_RUN_ENV, run_id), cache_installed(cache), monitor.running(cache, task_env):
        pipeline(**params)
    failed = [
        {
            "task": t.label,
            "stage": task_stage(t.label),
            "error": t.latest,
            "log": str(t.log),
            "last_lines": [ln.strip() for ln in t.tail],
        }
        for t in monitor.failed()
    ]
    return LocalRun(
        time.perf_counter() - t0,
        dict(cache.hits),
        run_dir / "logs",
        failed,
        {t.label: t.status for t in monitor.tasks.values()},
    )
