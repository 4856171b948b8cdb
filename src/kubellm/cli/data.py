"""``kubellm prep``: prepare a dataset directory from the config's ``data`` or ``instruct_data`` section."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from kubellm.cli.app import ConfigOpt, SetOpt, app, load, no_secrets, require
from kubellm.fsutil import user_path


class Section(StrEnum):
    data = "data"
    instruct_data = "instruct_data"


def _with_fields(data_cfg, section: Section, fields: dict[str, str]):  # -> DataConfig | None
    """The section with the ``--*-field`` options applied to every source, validated like the config."""
    from kubellm.config import DataConfig
    from kubellm.config.run import validate_section

    if data_cfg is None or not fields:
        return data_cfg
    doc = data_cfg.model_dump(mode="json")
    doc["sources"] = [{**s, **fields} for s in doc["sources"]]
    return validate_section(DataConfig, doc, f"kubellm prep ({section.value})")


@app.command()
def prep(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output directory (replaced atomically when done); "
            "relative paths must stay inside the current directory.",
            parser=user_path,
        ),
    ],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    section: Annotated[
        Section,
        typer.Option(
            help="Config section to prepare: the pretraining corpus (data) or the instruction data (instruct_data)."
        ),
    ] = Section.data,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="Reuse this tokenizer directory (or a prepared dataset's) instead of training one.", parser=user_path
        ),
    ] = None,
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            help="Read this file, directory, glob or URI instead of the section's sources "
            "(repeatable): data.jsonl, 'corpus/*.parquet', qa.csv, hf://owner/name, s3://…",
            callback=no_secrets,
        ),
    ] = None,
    text_field: Annotated[str | None, typer.Option(help="Field holding the text (pretraining data).")] = None,
    prompt_field: Annotated[
        str | None, typer.Option(help="Field holding the prompt (instruction data; implies --section instruct_data).")
    ] = None,
    response_field: Annotated[str | None, typer.Option(help="Field holding the answer (instruction data).")] = None,
    messages_field: Annotated[
        str | None, typer.Option(help="Field holding a chat as a list of {role, content} (instruction data).")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="With <section>.cluster.nodes > 0: print the prep RayJob as YAML, create nothing."
        ),
    ] = False,
) -> None:
    """Read sources, clean, de-duplicate, split, tokenize and pack into a prepared dataset directory.

    Own data in one command: `kubellm prep --source corpus.parquet --text-field body --out prepared`, or
    `kubellm prep --source qa.csv --prompt-field question --response-field answer --tokenizer prepared
    --out prepared-qa`.
    """
    from kubellm.fsutil import resolve_output
    from kubellm.log import print_table
    from kubellm.stages import StageContext
    from kubellm.stages import data as stage

    fields = {
        k: v
        for k, v in (
            ("text_field", text_field),
            ("prompt_field", prompt_field),
            ("response_field", response_field),
            ("messages_field", messages_field),
        )
        if v
    }
    if section is Section.data and fields.keys() & {"prompt_field", "response_field", "messages_field"}:
        section = Section.instruct_data
    # --source replaces the section's sources first, so a --set of sources[0].… (as hints print) applies
    # to it; the field options then apply to every source.
    sources = [f"{section.value}.sources={json.dumps([{'uri': uri} for uri in source])}"] if source else []
    cfg = load(config, [*sources, *(overrides or [])], reads=(section.value,))
    data_cfg = _with_fields(getattr(cfg, section.value), section, fields)
    require(data_cfg, section.value, config)
    if data_cfg.cluster.nodes:
        _prep_rayjob(cfg, section.value, str(out), tokenizer, dry_run)
        return
    target = Path(out) if Path(out).is_absolute() else resolve_output(out, root=Path.cwd())
    ctx = StageContext.for_command(cfg.tracking, cfg.workdir)
    name = "prep" if section is Section.data else "prep_instruct"
    result = stage.prep(data_cfg, target, ctx, stage=name, tokenizer_dir=tokenizer).values["result"]
    s = result.stats
    rows = [
        {"measure": "records read / kept", "value": f"{s['records_in']} / {s['records_out']}"},
        {"measure": "dropped", "value": ", ".join(f"{k}={v}" for k, v in s["dropped"].items()) or "none"},
        *(
            {"measure": f"{name} rows / tokens", "value": f"{sp['rows']} / {sp['tokens']}"}
            for name, sp in s["splits"].items()
        ),
        {"measure": "padding", "value": f"{s['padding_fraction']:.2%}"},
        {
            "measure": "vocabulary",
            "value": f"{result.manifest.vocab_size} ({'trained' if s['tokenizer']['trained'] else 'reused'})",
        },
        {"measure": "fingerprint", "value": result.manifest.fingerprint},
        {"measure": "seconds", "value": s["seconds"]["total"]},
        {"measure": "output", "value": str(result.path)},
    ]
    print_table(f"kubellm prep ({data_cfg.kind})", rows)


def _prep_rayjob(cfg, section: str, out: str, tokenizer: Path | None, dry_run: bool) -> None:  # cfg: RunConfig
    """``cluster.nodes > 0``: create the prep RayJob (``--out`` and ``--tokenizer`` are paths on the shared
    PVC, relative ones under /mnt/kubellm) and wait for it, or print it with ``--dry-run``."""
    import yaml

    from kubellm.k8s.rayjob import build_prep_rayjob
    from kubellm.k8s.training_job import run_prep_rayjob
    from kubellm.log import print_table

    tok = str(tokenizer) if tokenizer else None
    if dry_run:
        print(yaml.safe_dump(build_prep_rayjob(cfg, section, out, tok), sort_keys=False), end="")
        return
    job, outcome = run_prep_rayjob(cfg, section, out, tok)
    print_table(
        "kubellm prep (RayJob)",
        [
            {"measure": "job", "value": f"{outcome.namespace}/{outcome.name}"},
            {"measure": "created", "value": "yes" if outcome.created else "no (re-attached)"},
            {"measure": "seconds waited", "value": round(outcome.elapsed_s, 1)},
            {"measure": "output", "value": job["spec"]["entrypoint"].split("--out ", 1)[1].split(" ", 1)[0]},
        ],
    )
