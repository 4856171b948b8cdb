"""``report.md``: the prep's ``stats.json`` as a short page a person can read (Kubeflow UI, MLflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubellm.config.data import DataConfig
from kubellm.data.format import Manifest

SAMPLE_CHARS = 400


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _sample(tok: Any, root: Path) -> str:
    """The start of the first training row, decoded (what the model will actually see)."""
    from datasets import load_from_disk

    row = load_from_disk(str(root / "dataset"))["train"][0]["input_ids"]
    text = tok.decode(row, skip_special_tokens=False)[:SAMPLE_CHARS]
    return text.replace("```", "`\u200b``")


def render_report(cfg: DataConfig, stats: dict[str, Any], manifest: Manifest, tok: Any, root: Path) -> str:
    """Markdown: sources, what cleaning dropped and why, splits, tokenizer, a decoded sample."""
    lines = [
        f"# Prepared dataset ({cfg.kind})",
        "",
        f"Fingerprint `{manifest.fingerprint}` · block size {manifest.block_size} · "
        f"vocabulary {manifest.vocab_size} ({'trained here' if stats['tokenizer']['trained'] else 'reused'})"
        f" · {stats['seconds']['total']:.1f} s",
        "",
        "## Sources",
        "",
    ]
    lines += _table(
        ("uri", "files", "records read"), [(f"`{s['uri']}`", s["files"], s["records"]) for s in stats["sources"]]
    )
    lines += [
        "",
        "## Cleaning",
        "",
        f"{stats['records_in']} records read, {stats['records_out']} kept "
        f"({stats['records_out'] / max(1, stats['records_in']):.1%}).",
        "",
    ]
    if stats["dropped"]:
        lines += _table(("dropped because", "records"), sorted(stats["dropped"].items()))
    else:
        lines.append("Nothing was dropped.")
    lines += ["", "## Splits", ""]
    lines += _table(
        ("split", "records", "rows", "tokens", "padding"),
        [
            (name, s["records"], s["rows"], s["tokens"], f"{s['padding_fraction']:.2%}")
            for name, s in stats["splits"].items()
        ],
    )
    tail = sum(s["dropped_tail_tokens"] for s in stats["splits"].values())
    if cfg.kind == "pretrain":
        lines += [
            "",
            f"Documents are joined with EOS and cut into blocks of {cfg.block_size} tokens; "
            f"{tail} tokens of the last partial block per split were left out.",
        ]
    else:
        lines += [
            "",
            f"Prompt tokens carry label -100; {stats['heldout']} validation examples are in "
            "`heldout.jsonl` for generation metrics.",
        ]
    lines += ["", "## Sample (first training row, decoded)", "", "```", _sample(tok, root), "```", ""]
    return "\n".join(lines)
