"""The component reference (``docs/components.md``): every component's inputs and outputs with their types,
defaults and meaning, read from the components themselves (KFP parses their docstrings' ``Args:`` and
``Returns:`` into the component spec), so it cannot drift from what a pipeline can wire.

Regenerate with ``make docs``; ``tests/pipelines/test_reference.py`` fails when the file is stale.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

from kubellm import markdown

#: Where the reference lives in the repository.
REFERENCE = Path("docs") / "components.md"

_HEADER = """\
# Components

Every step of kubellm's pipelines is one of these KFP components (`kubellm.components`); a pipeline of
your own places them with `kubellm.pipelines.api.Builder.step` (see README, "Your own pipeline").
Inputs typed `Dataset`, `Model`, `Artifact` take another step's output (`task.outputs["NAME"]`); a
component's return value is its output `Output`. Generated from the components by `make docs`; do not edit.
"""


def _type(spec: Any) -> str:
    kind = str(spec.type)
    if getattr(spec, "is_artifact_list", False):
        kind = f"List[{kind}]"
    return kind.removeprefix("system.").split("@")[0]


def _describe(text: str | None) -> str:
    return " ".join((text or "").split())


def _docstring(comp: Any) -> dict[str, str]:
    """The docstring's ``Args:`` (inputs and output artifacts) and ``Returns:`` (the output ``Output``)."""
    import docstring_parser

    doc = docstring_parser.parse(getattr(comp, "python_func", comp).__doc__ or "")
    out = {p.arg_name: _describe(p.description) for p in doc.params}
    if doc.returns:
        out["Output"] = _describe(doc.returns.description)
    return out


def component_section(name: str, comp: Any) -> str:
    """One component: what it does, then a table of its inputs and one of its outputs."""
    spec = comp.component_spec
    summary = inspect.cleandoc(spec.description or "").split("\n\n")[0].replace("\n", " ")
    docs = _docstring(comp)
    inputs = [
        (
            f"`{k}`",
            f"`{_type(v)}`",
            "" if v.default is None else f"`{v.default!r}`",
            _describe(v.description) or docs.get(k, ""),
        )
        for k, v in (spec.inputs or {}).items()
    ]
    outputs = [
        (f"`{k}`", f"`{_type(v)}`", _describe(v.description) or docs.get(k, ""))
        for k, v in (spec.outputs or {}).items()
    ]
    parts = [f"## `{name}`\n\n{summary}\n"]
    if inputs:
        parts.append("Inputs:\n\n" + markdown.table(["name", "type", "default", "meaning"], inputs))
    if outputs:
        parts.append("Outputs:\n\n" + markdown.table(["name", "type", "what it holds"], outputs))
    return "\n".join(parts)


def render() -> str:
    from kubellm.pipelines._runner import COMPONENTS

    return _HEADER + "\n" + "\n".join(component_section(n, c) for n, c in COMPONENTS.items())


def main(argv: list[str] | None = None) -> int:
    """``python -m kubellm.pipelines.reference [ROOT]``: write ``docs/components.md`` under ROOT."""
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path(".")
    path = root / REFERENCE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
