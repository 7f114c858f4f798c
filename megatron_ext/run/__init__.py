"""The composition root of a run: the registered capabilities, the run config made of the core
sections and theirs, the checks that run before any work, and the assembly that asks the enabled
capabilities (backend resolution, the model builder, the datasets, parameter counts). Building
blocks below it (``models``, ``data``) never name the run config."""

from megatron_ext.run.checks import check_run, data_parallel_size
from megatron_ext.run.config import RunConfig, load_config, routed_experts
from megatron_ext.run.registry import CAPABILITIES

__all__ = ["CAPABILITIES", "RunConfig", "check_run", "data_parallel_size", "load_config", "routed_experts"]
