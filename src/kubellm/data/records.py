"""Mapping raw records to examples: a text (pretraining) or a list of chat messages (instruction data).

:func:`iter_examples` streams every source's records in order, honouring ``max_records`` and
``max_docs``; :func:`to_example` maps one record by the source's field settings (a ``messages`` column is
found without one, as TRL does). Malformed input raises :class:`~kubellm.errors.DataError` naming the
file and line and the setting that fixes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kubellm.config.data import DataConfig
from kubellm.data.sources import Source
from kubellm.errors import DataError

ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------- mapping
def _field(rec: dict[str, Any], name: str, origin: str, where: str, setting: str) -> str:
    if name not in rec:
        fields = ", ".join(map(str, list(rec)[:8])) or "none"
        raise DataError(
            f"{origin}: no field {name!r} (fields: {fields}); name the right one with "
            f"--set {where}.{setting}=FIELD (or `kubellm prep --{setting.replace('_', '-')} FIELD`)"
        )
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {name!r} is {type(value).__name__}, expected text")
    return value


#: The column a record of chat messages is found in without ``messages_field`` (as TRL detects it).
CHAT_FIELD = "messages"


def _messages(value: Any, origin: str, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{origin}: field {name!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{origin}: {name}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{origin}: {name}[{i}] has role {m['role']!r}, expected one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{origin}: {name} must end with an assistant message (the answer to learn)")
    if len(out) < 2 or out[-2]["role"] != "user":
        raise DataError(f"{origin}: {name}: the final assistant message must follow a user message")
    return out


def to_example(rec: Any, src: Source, kind: str, origin: str) -> str | list[dict[str, str]]:
    """One raw record mapped to a text (pretraining) or chat messages (instruction data)."""
    if not isinstance(rec, dict):
        raise DataError(f"{origin}: expected an object (a record with fields), got {type(rec).__name__}")
    c = src.cfg
    if kind == "pretrain":
        return _field(rec, c.text_field, origin, src.where, "text_field")
    if c.messages_field is not None:
        if c.messages_field not in rec:
            fields = ", ".join(map(str, list(rec)[:8])) or "none"
            raise DataError(
                f"{origin}: no field {c.messages_field!r} (fields: {fields}); name the right one "
                f"with --set {src.where}.messages_field=FIELD (or `kubellm prep --messages-field FIELD`)"
            )
        return _messages(rec[c.messages_field], origin, c.messages_field)
    if c.prompt_field not in rec and isinstance(rec.get(CHAT_FIELD), list):
        # A conversational record (TRL's convention: a ``messages`` column) needs no setting.
        return _messages(rec[CHAT_FIELD], origin, CHAT_FIELD)
    prompt = _field(rec, c.prompt_field, origin, src.where, "prompt_field")
    response = _field(rec, c.response_field, origin, src.where, "response_field")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def iter_examples(
    cfg: DataConfig,
    sources: list[Source],
    on_file: Callable[[], None] | None = None,
) -> Iterator[tuple[str, str | list[dict[str, str]], int]]:
    """``(origin, example, source index)`` over all sources in order, honouring ``max_records`` and
    ``max_docs``."""
    total = 0
    for index, src in enumerate(sources):
        for n, (origin, rec) in enumerate(src.records(cfg.max_record_bytes, on_file)):
            if cfg.max_docs is not None and total >= cfg.max_docs:
                return
            if src.cfg.max_records is not None and n >= src.cfg.max_records:
                break
            total += 1
            yield origin, checked_example(cfg, rec, src, origin), index


def checked_example(cfg: DataConfig, rec: Any, src: Source, origin: str) -> str | list[dict[str, str]]:
    """:func:`to_example`, refusing an example larger than ``max_record_bytes``."""
    example = to_example(rec, src, cfg.kind, origin)
    size = len(example) if isinstance(example, str) else sum(len(m["content"]) for m in example)
    # Characters are at most 4 UTF-8 bytes: only encode when the cheap bound is inconclusive.
    if size * 4 > cfg.max_record_bytes and _nbytes(example) > cfg.max_record_bytes:
        raise DataError(f"{origin}: record larger than max_record_bytes ({cfg.max_record_bytes} bytes)")
    return example


def _nbytes(example: str | list[dict[str, str]]) -> int:
    if isinstance(example, str):
        return len(example.encode())
    return sum(len(m["content"].encode()) for m in example)
