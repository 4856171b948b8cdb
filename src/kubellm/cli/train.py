"""`kubellm` commands of this area (registered on import)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kubellm.cli.app import ConfigOpt, SetOpt, app, load

# ---- training: pretrain, finetune ----------------------------------------------------------------
# Both validate the config and their inputs before any heavy import or work, call the same library
# function the KFP component calls, and exit 143 after a SIGTERM checkpoint (rerun to resume).

DataOpt = Annotated[Path, typer.Option("--data", help="A prepared dataset directory (`kubellm prep --out`).")]
OutOpt = Annotated[Path, typer.Option(
    "--out", help="Output directory; rerunning with the same one resumes from its last checkpoint.")]


def _print_result(title: str, result: object) -> None:
    from kubellm.log import print_table

    row = {k: v for k, v in result.to_json().items() if k != "output_dir"}  # type: ignore[attr-defined]
    print_table(title, [row])
    print(f"output: {result.output_dir}")  # type: ignore[attr-defined]


@app.command()
def pretrain(data: DataOpt, out: OutOpt, config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Pretrain a Llama-architecture model from scratch on a prepared pretraining dataset.

    Resumable: checkpoints every loop.checkpoint_every steps; SIGTERM writes one and exits 143. Runs
    unchanged under `torchrun --nproc_per_node N`.
    """
    from kubellm.config.train import PretrainConfig

    cfg = load(config, overrides).pretrain or PretrainConfig()
    from kubellm.train.pretrain import pretrain as run

    _print_result("pretrain", run(cfg, data, out))


@app.command()
def finetune(data: DataOpt, out: OutOpt, config: ConfigOpt = None, overrides: SetOpt = None,
             base: Annotated[str | None, typer.Option(
                 "--base", help="Base model: a local model directory or a Hub id (default: "
                 "finetune.base_model).")] = None) -> None:
    """LoRA fine-tune a causal LM on a prepared instruction dataset (loss on responses only).

    Writes the adapter (and merged/ with finetune.merge=true). Same resume, SIGTERM and torchrun
    behaviour as pretrain.
    """
    from kubellm.config.train import FinetuneConfig
    from kubellm.errors import ConfigError

    cfg = load(config, overrides).finetune or FinetuneConfig()
    base_model = base or cfg.base_model
    if not base_model:
        raise ConfigError("no base model: pass --base MODEL or set finetune.base_model")
    from kubellm.train.finetune import finetune as run

    _print_result("finetune", run(cfg, base_model, data, out))


# ---- end of training commands ----------------------------------------------------------------------
