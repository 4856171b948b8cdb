"""Compile pipelines and components to YAML, and run a pipeline on KFP's local runner.

Used by ``kubellm compile`` and ``kubellm run``; lives beside the pipelines because it imports kfp.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, local

from kubellm.components import data, deploy, evaluate, registry, tracking, train
from kubellm.config import RunConfig
from kubellm.pipelines import PIPELINES, build

#: Every component, by the file name its YAML gets under ``dist/components/``.
COMPONENTS = {
    "start-run": tracking.start_run,
    "finish-run": tracking.finish_run,
    "check-data": data.check_data,
    "prepare-data": data.prepare_data,
    "prepare-instructions": data.prepare_instructions,
    "fetch-model": train.fetch_model,
    "pretrain": train.pretrain,
    "finetune": train.finetune,
    "evaluate": evaluate.evaluate,
    "compare-with-champion": evaluate.compare_with_champion,
    "select-best": evaluate.select_best,
    "register": registry.register,
    "deploy": deploy.deploy,
}


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
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    if not docs or "pipelineInfo" not in docs[0] or "root" not in docs[0]:
        raise RuntimeError(f"{path}: compiled output is not a KFP pipeline spec")


def compile_all(cfg: RunConfig, out_dir: str | Path, names: list[str] | None = None, *,
                components: bool = True) -> list[Path]:
    """Compile the pipelines (for a cluster, with ``cfg``'s placement) and every component to
    ``out_dir`` (``<name>.yaml`` and ``components/<name>.yaml``). Deterministic: the same config gives
    the same bytes."""
    out = Path(out_dir)
    (out / "components").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in names or sorted(PIPELINES):
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(build(name, cfg, "cluster"), str(path))
        _stable_header(path)
        _check_yaml(path)
        written.append(path)
    for name, comp in sorted(COMPONENTS.items()) if components else ():
        path = out / "components" / f"{name}.yaml"
        compiler.Compiler().compile(comp, str(path))
        _stable_header(path)
        written.append(path)
    return written


def run_local(name: str, cfg: RunConfig, *, params: dict[str, Any], pipeline_root: str | Path,
              quiet: bool = False) -> float:
    """Run pipeline ``name`` on KFP's local runner in this Python environment; returns wall seconds.

    The run's success or failure is read afterwards from MLflow (see :mod:`kubellm.summary`): the
    local runner reports a failed task by logging, not by raising, once ``raise_on_error`` is off.
    """
    Path(pipeline_root).mkdir(parents=True, exist_ok=True)
    # "custom base image in a Python environment" and "display_name has no effect locally": both true
    # and both expected here (the image is this environment; display names are for the Kubeflow UI).
    warnings.filterwarnings("ignore", module=r"kfp\.local")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=False)
    pipeline = build(name, cfg, "local")
    t0 = time.perf_counter()
    kfp_logger = logging.getLogger("kfp")
    # The local runner streams every task's log; keep it on (progress) unless asked to be quiet.
    sink = io.StringIO() if quiet else None
    with contextlib.redirect_stdout(sink) if sink else contextlib.nullcontext():
        previous = kfp_logger.level
        if quiet:
            kfp_logger.setLevel(logging.WARNING)
        try:
            pipeline(**params)
        finally:
            kfp_logger.setLevel(previous)
    return time.perf_counter() - t0
