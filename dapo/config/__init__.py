"""Configuration: frozen dataclasses, one per concern (``sections``), with presets for DAPO, GRPO and each
Table-1 row; built as defaults <- preset <- a built-in task's own keys (``Task.train_overrides``) <- YAML file <-
``key=value`` overrides, then validated (``load``, ``validate``). Every command takes its options from here.
"""
from dapo.config.errors import ConfigError
from dapo.config.load import (
    config_changes, config_from_dict, default, describe, field_doc, load_config, parse_overrides, resume_named,
    run_config, save_config, valid_keys,
)
from dapo.config.sections import (
    ABLATION_ROWS, PRESET_DOCS, PRESETS, RENAMED, AlgoConfig, CheckpointConfig, Config, DataConfig, DistConfig,
    EnvConfig, EvalConfig, LogConfig, ModelConfig, OptimConfig, RewardConfig, RolloutConfig, SFTConfig, token_budget,
)
from dapo.config.validate import validate

__all__ = [
    "ABLATION_ROWS", "PRESETS", "PRESET_DOCS", "RENAMED", "AlgoConfig", "CheckpointConfig", "Config", "ConfigError",
    "DataConfig", "DistConfig", "EnvConfig", "EvalConfig", "LogConfig", "ModelConfig", "OptimConfig", "RewardConfig",
    "RolloutConfig", "SFTConfig", "config_changes", "config_from_dict", "default", "describe", "field_doc",
    "load_config", "parse_overrides", "resume_named", "run_config", "save_config", "token_budget", "valid_keys",
    "validate",
]
