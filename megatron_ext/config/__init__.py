"""Typed run configuration: dataclass sections, YAML loading with overrides, validation.

A leaf package (no torch, no other project package): capabilities build their own config sections
from :class:`Checks` and :class:`ConfigError`, and ``megatron_ext.run`` composes the run config.
"""

from megatron_ext.config.checks import Checks, ConfigError
from megatron_ext.config.loader import apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from megatron_ext.config.sections import (
    CORE_SECTIONS,
    MODALITIES,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    compose_run_config,
)

__all__ = [
    "CORE_SECTIONS",
    "CheckpointConfig",
    "Checks",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "MODALITIES",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "apply_overrides",
    "compose_run_config",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "to_dict",
]
