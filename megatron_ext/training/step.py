"""A training step: Megatron's forward/backward schedule, grad finalization, optimizer update.

The batch contract between data and model is a dict of ``[b, s]`` tensors: ``tokens``,
``labels``, ``loss_mask`` and ``position_ids``. The loss of a micro-batch is the masked mean of
the per-token cross entropy; Megatron's schedule divides it by the number of micro-batches, so
the step's gradient is that of the mean over micro-batches (and, through DDP, over DP ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_ext.parallel.state import comm_device


def masked_mean_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Loss function for Megatron's schedule: masked mean of per-token losses ``[b, s]``."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
    # clone: the schedule divides the returned loss in place by the number of micro-batches.
    return loss, {"lm loss": loss.detach().clone()}


def gpt_forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model):
    """Forward step for ``GPTModel``: returns per-token losses and the loss function to apply."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
    )
    return output, partial(masked_mean_loss, batch["loss_mask"])


@dataclass
class StepResult:
    """What one optimizer step reports on every rank."""

    loss: float
    """Mean LM loss over micro-batches (broadcast from the last pipeline stage)."""
    grad_norm: float
    """Global gradient L2 norm before clipping."""
    update_successful: bool
    """False when the update was skipped (non-finite gradients)."""


def _last_stage_mean_loss(losses_reduced: List[dict]) -> torch.Tensor:
    from megatron.core import parallel_state

    value = torch.zeros(1, dtype=torch.float64, device=comm_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses_reduced:
        value[0] = torch.stack([d["lm loss"].double() for d in losses_reduced]).mean()
    # Mean over data-parallel ranks, then hand the last stage's value to every stage.
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(dp_group) > 1:
        dist.all_reduce(value, group=dp_group)
        value /= dist.get_world_size(dp_group)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        dist.all_reduce(value, group=pp_group)  # only the last stage holds a non-zero value
    return value


def train_step(
    model: List[torch.nn.Module],
    optimizer,
    data_iterator,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step_func: Callable = gpt_forward_step,
    opt_param_scheduler=None,
    increment: Optional[int] = None,
) -> StepResult:
    """Run one step over ``num_microbatches`` micro-batches on DDP-wrapped ``model`` chunks."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    losses_reduced = forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful and opt_param_scheduler is not None:
        opt_param_scheduler.step(increment=increment)
    loss = _last_stage_mean_loss(losses_reduced)
    return StepResult(loss=float(loss), grad_norm=float(grad_norm), update_successful=update_successful)


@torch.no_grad()
def eval_step(
    model: List[torch.nn.Module],
    data_iterator,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step_func: Callable = gpt_forward_step,
) -> float:
    """Mean loss of one global batch without gradients (same schedule, ``forward_only``)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.eval()
    try:
        losses_reduced = get_forward_backward_func()(
            forward_step_func=forward_step_func,
            data_iterator=data_iterator,
            model=model,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    finally:
        for chunk in model:
            chunk.train()
    return float(_last_stage_mean_loss(losses_reduced))
