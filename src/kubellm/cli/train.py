"""`kubellm` commands of this area (registered on import)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kubellm.cli.app import ConfigOpt, SetOpt, app, load, no_secrets
from kubellm.fsutil import user_path

# ---- training: pretrain, finetune ----------------------------------------------------------------
# Both validate the config before any heavy import or work, call the same stage function the KFP
# component calls (tracked in MLflow per the config's tracking section; inside a training job's pod,
# rank 0 logs into the launching step's run), and exit 143 after a SIGTERM checkpoint (rerun to resume).

DataOpt = Annotated[
    Path, typer.Option("--data", help="A prepared dataset directory (`kubellm prep --out`).", parser=user_path)
]
OutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        help="Output directory; rerunning with the same one resumes from its last checkpoint.",
        parser=user_path,
    ),
]


def _context(cfg):  # -> StageContext
    from kubellm.stages import StageContext

    return StageContext.for_command(cfg.tracking, cfg.workdir)


def _print_result(title: str, out) -> None:  # out: StageOutput of a training stage
    import os

    from kubellm.log import print_table

    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    result = out.values["result"]
    row = {k: v for k, v in result.to_json().items() if k != "output_dir"}
    print_table(title, [row])
    print(f"output: {result.output_dir}")


@app.command()
def pretrain(data: DataOpt, out: OutOpt, config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Pretrain a Llama-architecture model from scratch on a prepared pretraining dataset.

    Resumable (rerun with the same --out); SIGTERM checkpoints and exits 143; works under torchrun.
    """
    from kubellm.config.train import PretrainConfig

    cfg = load(config, overrides, reads=("pretrain",))
    from kubellm.stages import train

    _print_result("pretrain", train.pretrain(cfg.pretrain or PretrainConfig(), data, out, _context(cfg)))


@app.command()
def finetune(
    data: DataOpt,
    out: OutOpt,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base model: a local model directory or a Hub id (default: finetune.base_model).",
            callback=no_secrets,
        ),
    ] = None,
) -> None:
    """LoRA fine-tune a causal LM on a prepared instruction dataset (loss on responses only).

    Writes the adapter (and merged/ with finetune.merge=true); resumes, checkpoints on SIGTERM like pretrain.
    """
    from kubellm.config.train import FinetuneConfig
    from kubellm.errors import ConfigError

    cfg = load(config, overrides, reads=("finetune",))
    section = cfg.finetune or FinetuneConfig()
    base_model = base or section.base_model
    if not base_model:
        raise ConfigError("no base model: pass --base MODEL or set finetune.base_model")
    from kubellm.stages import train

    _print_result("finetune", train.finetune(section, base_model, data, out, _context(cfg)))


# ---- end of training commands ----------------------------------------------------------------------


# ---- evaluation and the model registry: evaluate, register, promote --------------------------------
# `evaluate` logs to its own MLflow run (tracking.*; --set tracking.enabled=false logs nowhere) and exits
# 0 whether the gate passes or not: the gate's verdict is data, printed and written to metrics.json.

ModelOpt = Annotated[
    Path, typer.Option("--model", help="A model directory or LoRA adapter directory.", parser=user_path)
]
BaseOpt = Annotated[
    str | None,
    typer.Option(
        "--base",
        help="Base model to compare with (evaluate) or to merge the adapter into (register).",
        callback=no_secrets,
    ),
]


def _print_version(title: str, info) -> None:  # info: ModelVersionInfo
    from kubellm.log import print_table

    print_table(
        title,
        [{"name": info.name, "version": info.version, "aliases": ", ".join(info.aliases) or "-", "uri": info.uri}],
    )


@app.command()
def evaluate(
    model: ModelOpt,
    data: Annotated[
        Path,
        typer.Option("--data", help="The prepared dataset (validation split and held-out prompts).", parser=user_path),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Output folder: metrics.json, report.md, loss_curve.png (replaced atomically).",
            parser=user_path,
        ),
    ],
    base: BaseOpt = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Held-out perplexity and generation metrics, base vs candidate, and the promotion gate."""
    cfg = load(config, overrides, reads=("evaluate",))
    from kubellm.log import print_table
    from kubellm.stages import evaluate as stage

    res = stage.evaluate(cfg.evaluate, model, data, out, _context(cfg), base_model=base).values["result"]
    print_table("evaluation", [res.metrics])
    print(f"gate: {'PASSED' if res.passed else 'FAILED'}")
    for reason in res.reasons:
        print(f"  {reason}")
    print(f"report: {res.report_path}")


@app.command()
def register(
    model: ModelOpt,
    base: BaseOpt = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="MLflow run to log the model under (default: a new 'register' run).")
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Register a model as a new version with alias 'candidate': a LoRA adapter with a local --base as an
    adapter version recording its base version, or merged into its base (tracking.register_merged)."""
    cfg = load(config, overrides, reads=())
    from dataclasses import replace

    from kubellm.stages import registry

    ctx = _context(cfg)
    ctx = replace(ctx, tracking=cfg.tracking.model_copy(update={"register_merged": cfg.merged_versions()}))
    if run_id:
        ctx = replace(ctx, attach_run_id=run_id)
    _print_version("registered", registry.register(model, ctx, base_model=base).values["info"])


@app.command()
def promote(
    version: Annotated[int, typer.Option("--version", min=1, help="Registered version to promote.")],
    alias: Annotated[str, typer.Option("--alias", help="Alias to point at it.")] = "champion",
    force: Annotated[
        bool, typer.Option("--force", help="Roll back: move the alias even to a version older than the one holding it.")
    ] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Point an alias (default 'champion') at a registered version; only forward unless --force."""
    cfg = load(config, overrides, reads=())
    from kubellm.tracking import TrackingError, champion_info
    from kubellm.tracking import promote as run

    info = run(cfg.tracking, cfg.workdir, version, alias, force=force)
    if alias not in info.aliases:
        holder = champion_info(cfg.tracking, cfg.workdir, alias)
        raise TrackingError(
            f"{info.name}@{alias} is version {holder.version if holder else '?'}, newer than "
            f"{version}: not moved back; `kubellm promote --version {version} --force` rolls it back"
        )
    _print_version("promoted", info)


# ---- end of evaluation and registry commands --------------------------------------------------------
