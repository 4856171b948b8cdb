"""The ``kubellm`` command line: one typer app; each area registers its commands in its own module.

Commands import heavy libraries (torch, mlflow, kfp) inside their bodies, so ``kubellm --help`` and light
commands start fast. Errors a user can fix print one line and exit 2; a Ctrl-C exits 130.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kubellm.errors import KubellmError

app = typer.Typer(
    name="kubellm",
    help="The whole life of a language model on Kubernetes: prepare data, pretrain, LoRA fine-tune, "
    "evaluate, register, deploy on KServe, and try it in a playground, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML run config (see configs/); defaults to configs/local.yaml.",
                 dir_okay=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config field, e.g. --set data.max_docs=1000 (repeatable)."),
]

DEFAULT_CONFIG = Path("configs/local.yaml")


#: Sections every command reads (where it runs and where it logs).
COMMON_SECTIONS = ("name", "workdir", "tracking")


def load(config: Path | None, overrides: list[str] | None, reads: tuple[str, ...] | None = None):  # -> RunConfig
    """Load and validate the run config (before any work starts). ``reads`` names the sections the
    command uses: a ``--set`` of any other section is accepted (the config stays valid) but warned about,
    since it changes nothing."""
    from kubellm.config import load_config
    from kubellm.config.run import override_key

    path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    cfg = load_config(path, overrides or [])
    if reads is not None:
        from kubellm.log import get_logger

        used = set(reads) | set(COMMON_SECTIONS)
        for item in overrides or []:
            section = override_key(item.partition("=")[0]).split(".")[0]
            if section not in used:
                get_logger("cli").warning("--set %s: this command does not read the %r section; it has no "
                                          "effect here (it reads %s)", item.partition("=")[0], section,
                                          ", ".join(sorted(used)))
    return cfg


def require(section: object, name: str, config: Path | None) -> None:
    if section is None:
        where = str(config or DEFAULT_CONFIG)
        raise KubellmError(f"{where}: the config has no '{name}' section, which this command needs")


def _register_commands() -> None:
    # Each module adds its commands to ``app`` on import; all of them are light to import.
    from kubellm.cli import data, pipelines, platform, serve, train  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    from kubellm import log

    log.setup()
    _register_commands()
    try:
        # standalone mode: click prints usage errors itself and exits 2; --help exits 0.
        app(args=argv)
    except KubellmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


@app.callback()
def _root() -> None:
    """The whole life of a language model on Kubernetes, tracked in MLflow."""


@app.command()
def version() -> None:
    """Print the kubellm version."""
    from kubellm import __version__

    print(__version__)
