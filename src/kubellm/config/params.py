"""Configs as KFP pipeline parameters, losslessly.

KFP encodes dict parameters as protobuf Structs but refuses ``None`` inside them at compile time
("Value must be one of … Got None"), while our configs use ``None`` for "not set" / "disabled"
(``optim.grad_clip: null`` turns clipping off). So a config travels as its full JSON dump with every
``None`` removed and the dotted paths of the removed values listed under ``__null__``; the component
puts them back and re-validates with the same pydantic model.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from pydantic import BaseModel

from kubellm.config.run import validate_section

NULLS = "__null__"
M = TypeVar("M", bound=BaseModel)


def _strip(node: Any, path: str, nulls: list[str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if value is None:
                nulls.append(sub)
            else:
                out[key] = _strip(value, sub, nulls)
        return out
    if isinstance(node, list):
        return [_strip(v, f"{path}.{i}", nulls) for i, v in enumerate(node)]
    return node


def to_param(model: BaseModel | None) -> dict[str, Any]:
    """A KFP-safe dict of ``model`` (no ``None`` anywhere); ``{}`` for a missing section."""
    if model is None:
        return {}
    nulls: list[str] = []
    doc = _strip(model.model_dump(mode="json"), "", nulls)
    if nulls:
        doc[NULLS] = nulls
    return doc


def from_param(model_cls: type[M], doc: dict[str, Any], origin: str) -> M:
    """Restore the ``None`` values and validate (one-line ConfigError naming ``origin`` on failure)."""
    doc = copy.deepcopy(dict(doc))
    for dotted in doc.pop(NULLS, []):
        *parents, last = dotted.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = None
        else:
            node[last] = None
    return validate_section(model_cls, doc, origin)
