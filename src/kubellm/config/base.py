"""Shared base for every config model: strict, documented, immutable after validation."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base of every config section.

    ``extra="forbid"`` turns a typo (``max_step`` for ``max_steps``) into an error naming the field
    instead of a silently ignored key; ``validate_assignment`` keeps programmatic edits honest.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, use_attribute_docstrings=True)
