"""A run's configuration as the stack uses it: the registered capabilities, the run config made of
the core sections and theirs, and the checks that run before any work."""

from megatron_ext.run.checks import check_run, data_parallel_size
from megatron_ext.run.config import RunConfig, load_config
from megatron_ext.run.registry import CAPABILITIES

__all__ = ["CAPABILITIES", "RunConfig", "check_run", "data_parallel_size", "load_config"]
