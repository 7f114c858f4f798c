"""Checks of the ``logging`` section that need the launch (world size, device) or the environment."""

from __future__ import annotations

import importlib.util
from typing import List


def logging_problems(cfg, *, world_size: int, data_parallel: int, cuda: bool) -> List[str]:
    """One sentence per problem of ``cfg.logging`` for a job of ``world_size`` ranks."""
    lg, problems = cfg.logging, []
    if lg.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        problems.append(
            f"logging.wandb.mode={lg.wandb.mode!r} needs the wandb package, which is not installed: "
            "pip install '.[wandb]', or set logging.wandb.mode: disabled"
        )
    outside = [r for r in lg.profile.ranks if r >= world_size]
    if lg.profile.steps and outside:
        problems.append(
            f"logging.profile.ranks={lg.profile.ranks} names ranks {outside} of a job of {world_size} ranks "
            f"(0 .. {world_size - 1})"
        )
    if lg.profile.steps and lg.profile.start_step > cfg.train.steps:
        problems.append(
            f"logging.profile.start_step={lg.profile.start_step} is after the last step (train.steps="
            f"{cfg.train.steps}): nothing would be profiled"
        )
    if lg.norm_interval and lg.norm_interval % lg.log_interval:
        problems.append(
            f"logging.norm_interval={lg.norm_interval} is not a multiple of logging.log_interval="
            f"{lg.log_interval}: the norms are written with the logged steps"
        )
    if lg.norm_interval and cuda and data_parallel > 1:
        problems.append(
            f"logging.norm_interval={lg.norm_interval}: per-layer gradient norms are not available with the "
            f"distributed optimizer (GPU with {data_parallel} data-parallel ranks: each holds a shard of the "
            "gradients); set logging.norm_interval: 0"
        )
    if lg.memory_snapshot_step is not None and not cuda:
        problems.append(
            f"logging.memory_snapshot_step={lg.memory_snapshot_step} records the CUDA allocator, and this run "
            "has no GPU; drop it (the CPU run logs its resident set, mem/peak_gib)"
        )
    return problems
