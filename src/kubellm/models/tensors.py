"""Tensor checks every layer needs: reading a process's own shard, finding non-finite weights.

Here rather than in ``train`` because the registry checks a model's weights before logging it, and it
must not import the training package for that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def local(tensor: Any) -> Any:
    """This process's part of ``tensor``: the local shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def nonfinite_names(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    import torch

    return [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(local(t)).all())]
