"""Typed run configuration: dataclass sections, YAML loading with overrides, validation."""

from megatron_ext.config.checks import check_run, data_parallel_size
from megatron_ext.config.loader import ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from megatron_ext.config.schema import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)


def load_config(path, overrides=()) -> RunConfig:
    """Read ``path``, apply ``section.key=value`` overrides, build and validate the sections."""
    return from_dict(RunConfig, apply_overrides(load_yaml(path), overrides))


__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig", "MoEConfig",
    "ParallelConfig", "RunConfig", "TrainConfig", "apply_overrides", "check_run",
    "data_parallel_size", "dump_yaml", "from_dict", "load_config", "load_yaml", "to_dict",
]
