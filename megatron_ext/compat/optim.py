"""Megatron-Core's optimizer param groups, for an optimizer that is not Megatron's.

Written for megatron-core 0.16.1. ``get_megatron_optimizer`` builds its param groups (no weight
decay for biases and 1-D parameters, expert-parallel parameters in groups of their own, the
``max_lr`` / ``min_lr`` / ``wd_mult`` / ``lr_mult`` keys that ``OptimizerParamScheduler`` drives)
with the private ``megatron.core.optimizer._get_param_groups``; no public function returns them.
The CPU optimizer (:class:`~megatron_ext.optim.CPUAdamW`, used where Megatron's CUDA-only
optimizer wrappers cannot run) takes the same groups, so that both paths train alike.
"""

from __future__ import annotations

from typing import Dict, List

from megatron_ext.compat.internals import Internal, require

_PARAM_GROUPS = Internal(
    "megatron.core.optimizer",
    "_get_param_groups",
    parameters=("model_chunks", "config", "config_overrides"),
    positional=True,
)

INTERNALS = (_PARAM_GROUPS,)
"""Every Megatron-Core internal this module relies on."""


def megatron_param_groups(model_chunks: List, optimizer_config) -> List[Dict]:
    """The param groups ``get_megatron_optimizer`` would build for ``model_chunks`` (no overrides)."""
    require("megatron_ext.compat.optim.megatron_param_groups", INTERNALS)
    from megatron.core.optimizer import _get_param_groups

    return _get_param_groups(model_chunks, optimizer_config, None)
