"""The generated references in docs/ say what the code does: regenerate with `make docs` when one fails."""

from __future__ import annotations

from pathlib import Path

from kubellm.config.reference import fields, markdown

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_config_reference_lists_every_field_the_loader_accepts() -> None:
    assert (DOCS / "config.md").read_text(encoding="utf-8") == markdown(list(fields())), (
        "docs/config.md is stale: run `make docs`"
    )


def test_the_component_reference_lists_every_input_and_output() -> None:
    from kubellm.pipelines.reference import render

    text = render()
    assert (DOCS / "components.md").read_text(encoding="utf-8") == text, "docs/components.md is stale: run `make docs`"
    # what a user had to introspect a component spec to learn
    evaluate = text.split("## `evaluate`")[1].split("\n## ")[0]
    assert "| `results` | `Artifact` | metrics.json, report.md and loss_curve.png. |" in evaluate
    assert "| `Output` | `Boolean` | Whether the promotion gate passed. |" in evaluate
    prep = text.split("## `prepare-data`")[1].split("\n## ")[0]
    assert "| `Output` | `String` | The data fingerprint" in prep
