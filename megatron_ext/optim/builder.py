"""Pick the optimizer for the device: Megatron's (distributed) optimizer on GPU, CPUAdamW on CPU."""

from __future__ import annotations

from typing import List

from megatron_ext.compat import cpu_support_active
from megatron_ext.compat.optim import megatron_param_groups
from megatron_ext.optim.cpu_optimizer import CPUAdamW


def build_optimizer(optimizer_config, model_chunks: List):
    """Build the optimizer for ``model_chunks`` (Megatron DDP-wrapped) from an ``OptimizerConfig``.

    On CPU the param groups are Megatron's own (:func:`~megatron_ext.compat.optim.megatron_param_groups`),
    so weight-decay skipping and expert grouping are identical on both paths.
    """
    from megatron.core import parallel_state
    from megatron.core.optimizer import get_megatron_optimizer

    if not cpu_support_active():
        return get_megatron_optimizer(optimizer_config, model_chunks)
    if optimizer_config.optimizer != "adam":
        raise ValueError(f"optimizer={optimizer_config.optimizer!r} is not available on CPU: use 'adam' (AdamW).")
    param_groups = megatron_param_groups(model_chunks, optimizer_config)
    return CPUAdamW(
        param_groups,
        lr=optimizer_config.lr,
        weight_decay=optimizer_config.weight_decay,
        betas=(optimizer_config.adam_beta1, optimizer_config.adam_beta2),
        eps=optimizer_config.adam_eps,
        clip_grad=optimizer_config.clip_grad,
        dense_group=parallel_state.get_model_parallel_group(),
        expert_group=parallel_state.get_expert_tensor_model_pipeline_parallel_group(),
    )
