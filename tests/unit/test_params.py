"""Configs survive the trip through KFP parameters (which cannot hold None) unchanged."""

from __future__ import annotations

import pytest

from kubellm.config import FinetuneConfig, RunConfig, load_config
from kubellm.config.params import NULLS, from_param, to_param
from kubellm.errors import ConfigError


def _has_none(node) -> bool:
    if node is None:
        return True
    if isinstance(node, dict):
        return any(_has_none(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_none(v) for v in node)
    return False


def test_round_trip_keeps_explicit_nulls() -> None:
    cfg = load_config(
        "configs/local.yaml", ["finetune.optim.grad_clip=null", "evaluate.gate.max_perplexity_ratio=null"]
    )
    doc = to_param(cfg)
    assert not _has_none(doc)
    assert "finetune.optim.grad_clip" in doc[NULLS]
    back = from_param(RunConfig, doc, "run config")
    assert back == cfg
    assert back.finetune.optim.grad_clip is None
    assert back.evaluate.gate.max_perplexity_ratio is None


def test_section_round_trip_and_missing_section() -> None:
    cfg = load_config("configs/local.yaml")
    assert from_param(FinetuneConfig, to_param(cfg.finetune), "finetune") == cfg.finetune
    assert to_param(None) == {}


def test_invalid_param_names_origin_and_field() -> None:
    doc = to_param(load_config("configs/local.yaml").finetune)
    doc["loop"]["max_steps"] = -1
    with pytest.raises(ConfigError, match=r"finetune config: invalid config: loop.max_steps"):
        from_param(FinetuneConfig, doc, "finetune config")
