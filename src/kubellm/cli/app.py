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
from kubellm.fsutil import user_path

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
    typer.Option(
        "--config",
        "-c",
        help="YAML run config (see configs/; `kubellm init` writes a starter); "
        "default: the embedded default that ships with kubellm (configs/local.yaml in the repository).",
        parser=user_path,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config field, e.g. --set data.max_docs=1000 (repeatable)."),
]


def no_secrets(ctx: typer.Context, param: typer.CallbackParam, value: str | list[str] | None) -> str | list[str] | None:
    """Callback of every option that takes a URI, a model reference or a header: a credential in it is
    refused as a config's fields are (:func:`kubellm.config.secrets.secret_in`), in one line that names the
    option and never the value. A ``--set`` is checked as part of the config."""
    from kubellm.config.secrets import WHERE_CREDENTIALS_GO, secret_in
    from kubellm.errors import ConfigError

    for item in [value] if isinstance(value, str) else value or []:
        kind = secret_in(item)
        if kind is not None:
            raise ConfigError(
                f"{param.opts[0]}: holds {kind}; a command line is logged and shown (shell history, "
                f"ps, pod specs), never put a secret in it; {WHERE_CREDENTIALS_GO}"
            )
    return value


#: Sections every command reads (where it runs and where it logs).
COMMON_SECTIONS = ("name", "workdir", "tracking")


def load(config: Path | None, overrides: list[str] | None, reads: tuple[str, ...] | None = None):  # -> RunConfig
    """Load and validate the run config (before any work starts). ``reads`` names the sections the
    command uses: a ``--set`` of any other section is accepted (the config stays valid) but warned about,
    since it changes nothing."""
    from kubellm.config import default_config_path, load_config
    from kubellm.config.run import override_key

    cfg = load_config(config if config is not None else default_config_path(), overrides or [])
    if reads is not None:
        from kubellm.log import get_logger

        used = set(reads) | set(COMMON_SECTIONS)
        for item in overrides or []:
            section = override_key(item.partition("=")[0]).split(".")[0]
            if section not in used:
                get_logger("cli").warning(
                    "--set %s: this command does not read the %r section; it has no effect here (it reads %s)",
                    item.partition("=")[0],
                    section,
                    ", ".join(sorted(used)),
                )
    return cfg


def require(section: object, name: str, config: Path | None) -> None:
    if section is None:
        from kubellm.config import default_config_path

        where = str(config or default_config_path())
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


STARTER_HEADER = """\
# kubellm run config, written by `kubellm init` from the embedded default; edit it for your own data.
{schema}
#   kubellm prep --config {name} --out prepared            # the `data` section below
#   kubellm run  --config {name}                           # the whole lifecycle on this machine
#   kubellm config [SECTION]                                # every field: type, default, meaning
#
# Your own data: replace `builtin://stdlib` under data.sources with a path, glob or URI
# (corpus/*.parquet, hf://owner/name, s3://bucket/docs/*.jsonl.gz) and name its text column with
# `text_field`; for instruction data set `prompt_field`/`response_field` (or `messages_field`) under
# instruct_data.sources. Runs are tracked in a sqlite MLflow store under `workdir`; the end of
# `kubellm run` prints the command that opens it in the MLflow UI.
#
"""


def _without_leading_comments(text: str) -> str:
    """The embedded default minus its own header (written for the repository: `make run`, configs/)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")), len(lines))
    return "".join(lines[start:])


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter config.", parser=user_path)] = Path(
        "kubellm.yaml"
    ),
) -> None:
    """Write a commented starter run config (the embedded default) to edit for your own data, and the
    config's JSON Schema beside it (editors with the YAML language server complete and check fields)."""
    from kubellm.config import default_config_path, load_config
    from kubellm.config.reference import SCHEMA_COMMENT, SCHEMA_FILE, json_schema
    from kubellm.fsutil import write_json_atomic

    if path.exists():
        raise KubellmError(f"{path}: already exists; kubellm init never overwrites a file (choose another path)")
    schema_path = path.parent / SCHEMA_FILE
    # An existing schema file is kubellm's own (a newer init refreshes it); anything else there is the user's.
    if schema_path.exists() and not _is_our_schema(schema_path):
        raise KubellmError(
            f"{schema_path}: exists and is not a kubellm config schema; kubellm init never "
            "overwrites a file (move it, or write the config elsewhere)"
        )
    text = STARTER_HEADER.format(name=path, schema=SCHEMA_COMMENT + "\n#") + _without_leading_comments(
        default_config_path().read_text(encoding="utf-8")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        load_config(tmp)  # what we write must load
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_json_atomic(schema_path, json_schema())
    tmp.replace(path)
    print(
        f"wrote {path} (and {schema_path} for editors): edit data.sources / instruct_data.sources, then "
        f"`kubellm run --config {path}`"
    )


def _is_our_schema(path: Path) -> bool:
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and str(doc.get("$comment", "")).startswith("kubellm ")


@app.command(name="config")
def config_reference(
    sections: Annotated[
        list[str] | None,
        typer.Argument(
            help="Only these sections or fields (deploy, pretrain.loop, serve.max_prompt_tokens); default all."
        ),
    ] = None,
    schema: Annotated[bool, typer.Option("--schema", help="Print the config's JSON Schema instead.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="A Markdown table (for docs) instead of text.")] = False,
) -> None:
    """Every config field with its type, default and meaning, from the config models themselves."""
    import json

    from kubellm.config.reference import did_you_mean, fields

    if schema:
        from kubellm.config.reference import json_schema

        print(json.dumps(json_schema(), indent=2, sort_keys=True))
        return
    rows = list(fields())
    wanted = [s.strip().strip(".") for s in sections or []]
    for want in wanted:
        if not any(r.path == want or r.path.startswith(want + ".") or r.path.startswith(want + "[]") for r in rows):
            raise KubellmError(
                f"config has no section or field {want!r}" + did_you_mean(want, sorted({r.path for r in rows}))
            )
    if wanted:
        rows = [r for r in rows if any(r.path == w or r.path.startswith((w + ".", w + "[]")) for w in wanted)]
    if markdown:
        from kubellm.config.reference import markdown as render

        print(render(rows, header=not wanted), end="")
        return
    import textwrap

    for r in rows:
        print(f"{r.path}  ({r.type}, default {r.default})")
        if r.doc:
            print(textwrap.fill(r.doc, width=100, initial_indent="    ", subsequent_indent="    "))
