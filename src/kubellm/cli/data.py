"""``kubellm prep``: prepare a dataset directory from the config's ``data`` or ``instruct_data`` section."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from kubellm.cli.app import ConfigOpt, SetOpt, app, load, require


class Section(StrEnum):
    data = "data"
    instruct_data = "instruct_data"


@app.command()
def prep(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (replaced atomically when done); "
                                      "relative paths must stay inside the current directory.")],
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    section: Annotated[Section, typer.Option(help="Config section to prepare: the pretraining corpus "
                                             "(data) or the instruction data (instruct_data).")] = Section.data,
    tokenizer: Annotated[Path | None, typer.Option(help="Reuse this tokenizer directory (or a prepared "
                                                   "dataset's) instead of training one.")] = None,
) -> None:
    """Read sources, clean, de-duplicate, split, tokenize and pack into a prepared dataset directory."""
    from kubellm.fsutil import resolve_output
    from kubellm.log import print_table
    from kubellm.stages import StageContext
    from kubellm.stages import data as stage

    cfg = load(config, overrides)
    data_cfg = getattr(cfg, section.value)
    require(data_cfg, section.value, config)
    target = Path(out) if Path(out).is_absolute() else resolve_output(out, root=Path.cwd())
    ctx = StageContext.for_command(cfg.tracking, cfg.workdir)
    name = "prep" if section is Section.data else "prep_instruct"
    result = stage.prep(data_cfg, target, ctx, stage=name, tokenizer_dir=tokenizer).values["result"]
    s = result.stats
    rows = [
        {"measure": "records read / kept", "value": f"{s['records_in']} / {s['records_out']}"},
        {"measure": "dropped", "value": ", ".join(f"{k}={v}" for k, v in s["dropped"].items()) or "none"},
        *({"measure": f"{name} rows / tokens", "value": f"{sp['rows']} / {sp['tokens']}"}
          for name, sp in s["splits"].items()),
        {"measure": "padding", "value": f"{s['padding_fraction']:.2%}"},
        {"measure": "vocabulary", "value": f"{result.manifest.vocab_size} "
                                           f"({'trained' if s['tokenizer']['trained'] else 'reused'})"},
        {"measure": "fingerprint", "value": result.manifest.fingerprint},
        {"measure": "seconds", "value": s["seconds"]["total"]},
        {"measure": "output", "value": str(result.path)},
    ]
    print_table(f"kubellm prep ({data_cfg.kind})", rows)
