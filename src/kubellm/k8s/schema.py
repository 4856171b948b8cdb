"""Validate a custom resource against its CustomResourceDefinition, offline.

Generic manifest checkers know the built-in kinds only; a PyTorchJob, TrainJob, RayJob or
InferenceService is checked here against the ``openAPIV3Schema`` of the upstream CRD, the way the API
server would check it, with ``jsonschema``. The schemas of the CRDs kubellm generates resources for ship
inside the package (:data:`VENDORED`, see its ``SOURCES.md`` for the upstream repository, path and commit
of each), so validation needs no cluster, no network and no file beside the checkout; an upstream CRD
YAML file can be given instead.

- ``x-kubernetes-*`` keys are annotations; ``x-kubernetes-int-or-string`` accepts an integer or a string;
  ``nullable: true`` accepts ``null``.
- An object schema that lists ``properties`` rejects unknown keys unless it says
  ``x-kubernetes-preserve-unknown-fields``. The API server would silently *prune* such keys, which hides
  a typo (``tolleration``) until the pod runs without it; an error here is what a manifest builder wants.
- ``x-kubernetes-validations`` (CEL rules) are not evaluated: no CEL engine in Python here. The trainer
  CRDs carry 30 of them (mostly immutability rules for updates, which a create never meets).

Vendored copies keep each *served* version's schema without ``description`` texts: the five upstream CRDs
are 5.1 MB of YAML, mostly prose; gzipped JSON without it is 60 kB and loads in ~0.1 s instead of the
~0.5 s the C YAML parser needs for the 2 MB InferenceService CRD alone. Loaded schemas are cached per file.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from kubellm.errors import KubellmError

__all__ = ["VENDORED", "crd_schema", "extract_crd", "validate_against_crd", "validate_custom_resources", "vendored_crd"]

#: The vendored schemas: one ``<group>_<plural>.json.gz`` per CRD (written by ``regenerate.py`` there).
VENDORED = Path(__file__).resolve().parent / "schemas"
VENDORED_SUFFIX = ".json.gz"
#: Schema keys that only document (dropped from vendored copies and from validation).
_DOC_KEYS = ("description", "example", "externalDocs")
#: Keys whose values map *names* to schemas (a property may be called ``description``).
_NAMED = ("properties", "patternProperties", "definitions")


def validate_against_crd(obj: dict, crd_path: str | Path | None = None) -> list[str]:
    """Errors of ``obj`` against its CRD; an empty list means valid.

    ``crd_path``: an upstream CRD YAML file or a vendored ``.json.gz``; ``None`` picks the vendored CRD of
    ``obj``'s group and kind. The version is taken from ``obj["apiVersion"]``; a group or kind that is not
    the CRD's is an error too. Each error is one line: ``<dotted.path[index]>: <message>``, sorted by path.
    Raises :class:`KubellmError` when the CRD file is missing or is not a CustomResourceDefinition, or
    (``crd_path=None``) when no CRD of ``obj``'s kind is vendored.
    """
    import jsonschema

    if not isinstance(obj, dict):
        return [f"<root>: expected a mapping, got {type(obj).__name__}"]
    api_version = str(obj.get("apiVersion", ""))
    obj_group, _, version = api_version.rpartition("/")
    if crd_path is None:
        crd_path = vendored_crd(obj_group, str(obj.get("kind", "")))
        if crd_path is None:
            raise KubellmError(
                f"no vendored CRD schema for {api_version}/{obj.get('kind')} "
                f"(have: {', '.join(sorted(k for _, k in _vendored_index()))})"
            )
    crd_path = Path(crd_path)
    crd = _load(str(crd_path.resolve()), _mtime(crd_path))
    errors: list[str] = []
    if obj_group != crd["group"]:
        errors.append(f"apiVersion: {api_version!r} is not in group {crd['group']!r} of {crd_path.name}")
    if obj.get("kind") != crd["kind"]:
        errors.append(f"kind: {obj.get('kind')!r} is not {crd['kind']!r} of {crd_path.name}")
    if version not in crd["versions"]:
        errors.append(
            f"apiVersion: version {version!r} not served by {crd_path.name} (has {', '.join(crd['versions'])})"
        )
        return errors
    schema = crd_schema(crd_path, version)
    validator = jsonschema.Draft4Validator(schema)
    found = [(_path(err.absolute_path), err.message) for err in validator.iter_errors(obj)]
    errors.extend(f"{path}: {_short(message)}" for path, message in sorted(found))
    return errors


def validate_custom_resources(named: Iterable[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """``<source> <Kind>/<name>: <error>`` for every ``(source, object)`` whose kind has a vendored CRD
    (others are skipped: built-in kinds are for ``kubernetes-validate``); ``kind: List`` items included."""
    out: list[str] = []
    for source, obj in named:
        items = obj.get("items") or [] if obj.get("kind") == "List" else [obj]
        for item in items:
            if not isinstance(item, dict):
                continue
            group = str(item.get("apiVersion", "")).rpartition("/")[0]
            if vendored_crd(group, str(item.get("kind", ""))) is None:
                continue
            where = f"{source} {item.get('kind')}/{(item.get('metadata') or {}).get('name', '?')}"
            out += [f"{where}: {err}" for err in validate_against_crd(item)]
    return out


def vendored_crd(group: str, kind: str) -> Path | None:
    """The vendored schema file of ``group``/``kind``, or None."""
    return _vendored_index().get((group, kind))


def crd_schema(crd_path: str | Path, version: str) -> dict[str, Any]:
    """The JSON Schema (converted from ``openAPIV3Schema``) of ``version`` in the CRD at ``crd_path``."""
    crd_path = Path(crd_path)
    return _converted(str(crd_path.resolve()), _mtime(crd_path), version)


def extract_crd(doc: Mapping[str, Any], source: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compact form of a CustomResourceDefinition document: group, kind, plural and each served
    version's ``openAPIV3Schema`` without documentation keys; ``source`` (repository, path, commit) is
    recorded as given. Raises :class:`KubellmError` for a document that is not a CRD."""
    if not isinstance(doc, Mapping) or doc.get("kind") != "CustomResourceDefinition":
        raise KubellmError("not a CustomResourceDefinition document")
    spec = doc.get("spec") or {}
    versions = {}
    for entry in spec.get("versions") or []:
        raw = (entry.get("schema") or {}).get("openAPIV3Schema")
        if entry.get("served", True) and isinstance(raw, dict):
            versions[entry["name"]] = _strip_docs(raw)
    if not versions:
        raise KubellmError(f"CRD {(doc.get('metadata') or {}).get('name')}: no served version with a schema")
    names = spec.get("names") or {}
    out = {
        "group": spec.get("group", ""),
        "kind": names.get("kind", ""),
        "plural": names.get("plural", ""),
        "versions": versions,
    }
    if source:
        out["source"] = dict(source)
    return out


def _strip_docs(node: Any) -> Any:
    if isinstance(node, list):
        return [_strip_docs(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DOC_KEYS:
            continue
        if key in _NAMED and isinstance(value, dict):
            out[key] = {name: _strip_docs(sub) for name, sub in value.items()}
        elif key in ("enum", "required", "default"):
            out[key] = value
        else:
            out[key] = _strip_docs(value)
    return out


@lru_cache(maxsize=1)
def _vendored_index() -> dict[tuple[str, str], Path]:
    index = {}
    for path in sorted(VENDORED.glob(f"*{VENDORED_SUFFIX}")):
        crd = _load(str(path), _mtime(path))
        index[(crd["group"], crd["kind"])] = path
    return index


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError as err:
        raise KubellmError(f"{path}: cannot read CRD file ({err.strerror})") from None


@lru_cache(maxsize=16)
def _load(path: str, mtime: float) -> dict[str, Any]:
    """The compact CRD (see :func:`extract_crd`) from a vendored ``.json.gz`` or an upstream YAML file."""
    if path.endswith(VENDORED_SUFFIX):
        try:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError) as err:
            raise KubellmError(f"{path}: unreadable vendored CRD schema ({err})") from None
    from kubellm import yamlio

    with open(path, encoding="utf-8") as fh:
        for doc in yamlio.load_all(fh):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                return extract_crd(doc)
    raise KubellmError(f"{path}: no CustomResourceDefinition document in the file")


@lru_cache(maxsize=16)
def _converted(path: str, mtime: float, version: str) -> dict[str, Any]:
    raw = _load(path, mtime)["versions"].get(version)
    if raw is None:
        raise KubellmError(f"{path}: no served version {version!r}")
    return _to_json_schema(raw)


def _to_json_schema(node: Any) -> Any:
    """Turn an OpenAPI v3 structural schema into a Draft 4 JSON Schema (see the module docstring)."""
    if isinstance(node, list):
        return [_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable" or key in _DOC_KEYS:
            continue
        if key in _NAMED:
            out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        elif isinstance(value, (dict, list)) and key not in ("enum", "required", "default"):
            out[key] = _to_json_schema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    return out


def _path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def _short(message: str, limit: int = 200) -> str:
    # jsonschema quotes the whole offending value; a pod spec would make a 5 kB line.
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
