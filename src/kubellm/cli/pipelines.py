"""``kubellm run | compile | submit | schedule``: the pipelines, locally and on Kubeflow.

These commands reach the KFP layers (``kubellm.pipelines``) through lazy imports: the CLI is the entry
point that sits above all three layers, while the library modules themselves never import kfp.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from kubellm.cli.app import ConfigOpt, SetOpt, app, load
from kubellm.errors import ConfigError, KubellmError

PipelineOpt = Annotated[str, typer.Option("--pipeline", "-p", help="llm-lifecycle, llm-finetune, "
                                          "llm-lora-sweep or llm-continuous-finetune.")]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", help="Set a pipeline run parameter, e.g. "
                                                    "--param base_model=/models/base (repeatable).")]


def parse_params(items: list[str] | None) -> dict[str, object]:
    from kubellm.config.run import _parse_value

    out: dict[str, object] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        out[key.strip()] = _parse_value(raw)
    return out


@app.command()
def run(config: ConfigOpt = None, overrides: SetOpt = None, pipeline: PipelineOpt = "llm-lifecycle",
        params: ParamOpt = None,
        quiet: Annotated[bool, typer.Option(help="Hide the tasks' own logs.")] = False) -> None:
    """Run a pipeline on KFP's local runner on this machine (the embedded default: configs/local.yaml).

    Prints a per-stage summary and writes summary.json under <workdir>/runs/<run name>/. Exits 1 when a
    stage failed (the summary names it), 0 otherwise — also when the promotion gate closed.
    """
    from kubellm import summary as summ
    from kubellm.log import get_logger, print_table
    from kubellm.pipelines import STAGES
    from kubellm.pipelines._runner import run_local

    cfg = load(config, overrides)
    log = get_logger("run")
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir = Path(cfg.workdir).resolve()
    out_dir = workdir / "runs" / run_name
    run_params = {"run_name": run_name, **parse_params(params)}
    if pipeline != "llm-lifecycle" and not (run_params.get("base_model") or (cfg.finetune and cfg.finetune.base_model)):
        raise ConfigError(f"{pipeline} starts from an existing model: pass --param base_model=DIR "
                          "(or set finetune.base_model)")
    log.info("running %s as %s (pipeline root %s)", pipeline, run_name, workdir / "pipeline-root")
    wall = run_local(pipeline, cfg, params=run_params, pipeline_root=workdir / "pipeline-root", quiet=quiet)
    if not cfg.tracking.enabled:
        log.info("%s finished in %.1f s; tracking is disabled, so there is no run summary", pipeline, wall)
        return
    result = summ.collect(cfg.tracking, workdir, pipeline=pipeline, run_name=run_name,
                          stages=STAGES.get(pipeline, []), wall_seconds=wall)
    path = summ.write(result, out_dir)
    print_table(f"{pipeline} · {run_name}", summ.table_rows(result))
    print(summ.headline(result))
    print(f"summary: {path}")
    if result["status"] != "FINISHED" or result["failed_stage"]:
        raise typer.Exit(1)


@app.command(name="compile")
def compile_(config: ConfigOpt = None, overrides: SetOpt = None,
             out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("dist"),
             pipeline: Annotated[list[str] | None, typer.Option("--pipeline", "-p", help="Only these pipelines "
                                                                "(repeatable); default all.")] = None) -> None:
    """Compile every pipeline (with the config's Kubernetes placement) and component to YAML.

    The output is deterministic: the same config gives byte-identical files.
    """
    from kubellm.log import print_table
    from kubellm.pipelines import PIPELINES
    from kubellm.pipelines._runner import compile_all

    cfg = load(config, overrides)
    unknown = sorted(set(pipeline or []) - set(PIPELINES))
    if unknown:
        raise ConfigError(f"unknown pipeline(s) {unknown}; expected some of {sorted(PIPELINES)}")
    t0 = time.perf_counter()
    written = compile_all(cfg, out, pipeline or None)
    print_table(f"compiled in {time.perf_counter() - t0:.2f} s",
                [{"file": str(p), "bytes": p.stat().st_size} for p in written])


