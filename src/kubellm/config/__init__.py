"""Typed run configs: one pydantic model per stage, gathered in :class:`RunConfig`."""

from kubellm.config.data import CleaningConfig, DataConfig, SourceConfig, SplitConfig, TokenizerConfig
from kubellm.config.evaluate import EvalConfig, GateConfig
from kubellm.config.platform import DistributedConfig, Placement, PlatformConfig
from kubellm.config.run import RunConfig, apply_overrides, default_config_path, load_config, validate_section
from kubellm.config.serve import ServeConfig
from kubellm.config.tracking import TrackingConfig
from kubellm.config.train import (
    FinetuneConfig,
    LoopConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
)

__all__ = [
    "CleaningConfig",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "FinetuneConfig",
    "GateConfig",
    "LoopConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "Placement",
    "PlatformConfig",
    "PretrainConfig",
    "RunConfig",
    "ServeConfig",
    "SourceConfig",
    "SplitConfig",
    "TokenizerConfig",
    "TrackingConfig",
    "apply_overrides",
    "default_config_path",
    "load_config",
    "validate_section",
]
