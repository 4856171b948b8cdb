"""The config reference, made from the pydantic models themselves: every field of every section with its
type, default and meaning (``kubellm config``), a JSON Schema for editors, and "did you mean" for a
misspelt field.

Nothing here is written by hand: a field documented in its model (an attribute docstring) is documented
here, so the reference cannot drift from what the loader accepts.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

#: What ``kubellm init`` writes beside a config, and the YAML language server's comment that points to it.
SCHEMA_FILE = "kubellm-config.schema.json"
SCHEMA_COMMENT = f"# yaml-language-server: $schema=./{SCHEMA_FILE}"


@dataclass(frozen=True)
class FieldDoc:
    """One row of the reference: ``deploy.startup_timeout_s``, ``float``, ``600.0``, its meaning."""

    path: str
    type: str
    default: str
    doc: str


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation holds: ``X``, ``X | None``, ``list[X]``, ``dict[str, X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (list, tuple):
        return True
    return any(
        _is_list(a)
        for a in typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
    )


def _type_name(annotation: Any) -> str:
    """``int``, ``str | None``, ``'ddp' | 'fsdp'``, ``list[SourceConfig]``: as a person writes it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that needs the validated data
            return "(computed)"
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return json.dumps(value, default=str)


def _one_line(doc: str | None) -> str:
    return " ".join((doc or "").split())


def fields(model: type[BaseModel] | None = None, prefix: str = "") -> Iterator[FieldDoc]:
    """Every field of ``model`` (default: the whole run config), sections depth first; a list of sections
    is written ``sources[].uri``."""
    if model is None:
        from kubellm.config.run import RunConfig

        model = RunConfig
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        yield FieldDoc(path, _type_name(field.annotation), _default(field), _one_line(field.description))
        for sub in nested[:1]:
            yield from fields(sub, f"{path}[]." if _is_list(field.annotation) else f"{path}.")


def model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The config model a validation error's location points into (list indexes and dict keys skipped)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        nested = _models_in(field.annotation)
        if not nested:
            return None
        model = nested[0]
    return model


def suggest(name: str, candidates: Sequence[str]) -> list[str]:
    """The few candidates ``name`` was most likely meant to be: close spellings (``max_step`` →
    ``max_steps``) and prefixes either way (``base`` → ``base_model``, ``startup_timeout`` →
    ``startup_timeout_s``)."""
    name = name.strip().lower()
    prefixed = [c for c in candidates if len(name) >= 3 and (c.startswith(name) or name.startswith(c))]
    return prefixed[:3] or difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)


def did_you_mean(name: str, candidates: Sequence[str]) -> str:
    """``; did you mean `max_steps`?`` or ``""``."""
    near = suggest(name, candidates)
    return f"; did you mean {' or '.join(f'`{n}`' for n in near)}?" if near else ""


def unknown_field_hint(root: type[BaseModel], loc: Sequence[str | int]) -> str:
    """What to say about an unknown field at ``loc`` of a ``root`` document."""
    parent = model_at(root, loc[:-1])
    if parent is None or not loc:
        return ""
    return did_you_mean(str(loc[-1]), list(parent.model_fields))


def json_schema() -> dict[str, Any]:
    """The run config's JSON Schema (draft 2020-12), for editors and the YAML language server."""
    from kubellm import __version__
    from kubellm.config.run import RunConfig

    schema = RunConfig.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"kubellm {__version__} run config; written by kubellm from its config models",
        **schema,
    }


MARKDOWN_HEADER = """\
# Config reference

Every field of kubellm's run config, with its type, default and meaning: what `kubellm config` prints.
A field is written by its path (`deploy.startup_timeout_s`; `sources[].uri` is a field of each list item),
as `--set` takes it. Generated from the config models by `make docs`; do not edit.
"""


def markdown(rows: Sequence[FieldDoc], *, header: bool = True) -> str:
    """The reference as a Markdown table (``docs/config.md`` when ``rows`` is every field)."""
    from kubellm.markdown import table

    body = table(
        ["field", "type", "default", "meaning"], [(f"`{r.path}`", f"`{r.type}`", f"`{r.default}`", r.doc) for r in rows]
    )
    return (MARKDOWN_HEADER + "\n" if header else "") + body
