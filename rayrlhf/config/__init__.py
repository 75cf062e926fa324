"""Typed run configuration: one pydantic model per component, validated before Ray starts.

A run is a YAML recipe from `configs/` plus `--set section.key=value` overrides. Every model
forbids unknown keys, so a typo is an error naming the field, never a silently ignored setting.
Each field's docstring is its documentation (`rayrlhf train --help-config` prints them).

`base` holds the bases every command shares, `loading` the YAML and override loader, `rewards`
and `ppo` the PPO run's sections; the other commands' configs live beside their recipes.
"""

from rayrlhf.config.base import (
    ConfigError,
    CriticConfig,
    PolicyConfig,
    RankGroupConfig,
    RayRunConfig,
    Resources,
    RunConfig,
    Section,
)
from rayrlhf.config.loading import (
    format_validation_error,
    load_recipe,
    parse_overrides,
    read_yaml,
    set_dotted,
)
from rayrlhf.config.ppo import (
    CRITIC_ESTIMATORS,
    DEFAULT_CONFIG,
    GROUP_ESTIMATORS,
    AdvantageName,
    AggregationMode,
    AlgorithmConfig,
    ChatTemplateMode,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    FaultConfig,
    KLEstimatorName,
    MetricsConfig,
    OnBadRow,
    PreferenceLossName,
    ReferenceConfig,
    RolloutConfig,
    SyncConfig,
    TrainConfig,
    load_config,
)
from rayrlhf.config.rewards import (
    JudgeConfig,
    RemoteRewardConfig,
    RewardConfig,
    RuleSpec,
)

__all__ = [
    "ConfigError",
    "Section",
    "Resources",
    "RankGroupConfig",
    "PolicyConfig",
    "CriticConfig",
    "RunConfig",
    "RayRunConfig",
    "set_dotted",
    "parse_overrides",
    "load_recipe",
    "read_yaml",
    "format_validation_error",
    "RuleSpec",
    "JudgeConfig",
    "RemoteRewardConfig",
    "RewardConfig",
    "DEFAULT_CONFIG",
    "ReferenceConfig",
    "RolloutConfig",
    "OnBadRow",
    "ChatTemplateMode",
    "DataConfig",
    "EvalConfig",
    "CheckpointConfig",
    "FaultConfig",
    "AdvantageName",
    "GROUP_ESTIMATORS",
    "CRITIC_ESTIMATORS",
    "KLEstimatorName",
    "AggregationMode",
    "PreferenceLossName",
    "AlgorithmConfig",
    "SyncConfig",
    "MetricsConfig",
    "TrainConfig",
    "load_config",
]
