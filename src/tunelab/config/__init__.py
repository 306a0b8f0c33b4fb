"""Typed configuration: schema (dataclasses) and load (YAML, overrides, validation)."""

from tunelab.config.load import config_to_dict, load_config, save_config, validate
from tunelab.config.schema import (DataConfig, LoraConfig, ModelConfig, PreferenceConfig, PretrainConfig, RLConfig,
                                   RunConfig, TrainConfig)

__all__ = ["load_config", "save_config", "config_to_dict", "validate",
           "RunConfig", "ModelConfig", "DataConfig", "LoraConfig", "TrainConfig",
           "PretrainConfig", "PreferenceConfig", "RLConfig"]
