"""A training step: Megatron's forward/backward schedule, grad finalization, optimizer update.

The batch contract between data and model is a dict of ``[b, s]`` tensors: ``tokens``,
``labels``, ``loss_mask``, ``position_ids``, ``modality_ids`` (of the inputs; the model never reads
them, a capability's batch hook may hand them to its modules) and ``label_modality_ids`` (of the
targets; used for per-modality losses). The loss of a micro-batch is the masked mean of
the per-token cross entropy; Megatron's schedule divides it by the number of micro-batches, so
the step's gradient is that of the mean over micro-batches (and, through DDP, over DP ranks).

Under context parallelism (CP) each rank of a CP group holds two chunks of every sequence
(Megatron's ``get_batch_on_this_cp_rank``) and its loss is its tokens' loss sum over the token
count of the whole CP group; Megatron's schedule multiplies it by the CP size and DDP averages
over DP x CP, which gives the same gradient as the mean over whole sequences on one rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_ext.data.synthetic import step_micro_batches
from megatron_ext.data.vocab import MODALITIES
from megatron_ext.parallel.state import comm_device
from megatron_ext.training.capabilities import batch_hooks


def modality_rescaled_loss(
    losses: torch.Tensor,
    mask: torch.Tensor,
    target_modality: torch.Tensor,
    modality_weights: Optional[torch.Tensor],
    cp_group: Optional[dist.ProcessGroup] = None,
):
    """ERNIE 5.0's per-modality loss rescaling (``data.modality_loss_rescaling``), as we read it.

    What the report says [paper, METHODS.md section 3]: one unified objective over the tokens of every
    modality, with the modalities' losses rescaled so that none dominates by its token count; the
    report's text with the exact rule is not available to us. Our reading [choice]: each modality m
    present in the micro-batch contributes its own mean token loss, and the means are combined with
    weights ``w_m`` (``data.loss_weights``, 1 for every modality without them) normalised over the
    modalities present::

        loss = sum_m w_m * (sum_{t in m} l_t / n_m) / sum_{m: n_m > 0} w_m

    over the masked tokens t whose target is of modality m, ``n_m`` their count. [choice] The counts are
    the micro-batch's (over the whole sequences under context parallelism, ``cp_group``), not the
    global batch's: Megatron's schedule then averages the micro-batches as for the plain mean.

    ``losses``, ``mask``, ``target_modality``: ``[b, s]``. Returns ``(loss, reported)``: the loss of
    this rank's tokens, and the detached loss of the whole sequences.
    """
    flat_modality = target_modality.reshape(-1)
    sums = torch.zeros(len(MODALITIES), dtype=losses.dtype, device=losses.device)
    sums = sums.index_add(0, flat_modality, (losses * mask).reshape(-1))  # [M], differentiable
    counts = torch.zeros(len(MODALITIES), dtype=losses.dtype, device=losses.device)
    counts = counts.index_add(0, flat_modality, mask.reshape(-1))
    totals = sums.detach()
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        both = torch.stack([totals, counts]).double()
        dist.all_reduce(both, group=cp_group)
        totals, counts = both[0].to(losses.dtype), both[1].to(losses.dtype)
    weights = torch.ones_like(counts) if modality_weights is None else modality_weights.to(counts.dtype)
    weights = weights * (counts > 0)
    norm = weights.sum().clamp(min=torch.finfo(counts.dtype).tiny)
    per_token = weights / counts.clamp(min=1.0) / norm  # [M]: the weight of one token of modality m
    return (sums * per_token).sum(), (totals * per_token).sum()


def masked_mean_loss(
    batch: Dict[str, torch.Tensor],
    output_tensor: torch.Tensor,
    loss_weights: Optional[torch.Tensor] = None,
    cp_group: Optional[dist.ProcessGroup] = None,
    rescale_modalities: bool = False,
):
    """Loss function for Megatron's schedule: masked mean of per-token losses ``[b, s]``.

    ``loss_weights[m]`` scales the loss of tokens whose target is of modality m (default 1).
    Also reports, per modality, the unweighted loss sum and token count of the micro-batch
    (``[num_modalities, 2]``) for ``loss/<modality>`` metrics. With a ``cp_group`` of more than one
    rank, the tokens are this rank's part of the sequences: the sum is divided by the group's token
    count (the schedule multiplies by the CP size), and the reported loss is the whole sequences'.
    ``rescale_modalities``: the loss is :func:`modality_rescaled_loss` instead (``loss_weights`` then
    weigh the modalities' means).
    """
    losses = output_tensor.float()  # [b, s]
    mask = batch["loss_mask"].float()
    target_modality = batch["label_modality_ids"]
    weight = mask if loss_weights is None or rescale_modalities else mask * loss_weights[target_modality]
    weighted_sum, count = (losses * weight).sum(), mask.sum()
    if rescale_modalities:  # the modalities' means instead of the token mean
        loss, reported = modality_rescaled_loss(losses, mask, target_modality, loss_weights, cp_group)
    elif cp_group is not None and dist.get_world_size(cp_group) > 1:
        totals = torch.stack([weighted_sum.detach(), count]).double()
        dist.all_reduce(totals, group=cp_group)
        total_sum, total_count = totals[0].float(), totals[1].float().clamp(min=1.0)
        loss = weighted_sum / total_count
        reported = total_sum / total_count
    else:
        loss = weighted_sum / count.clamp(min=1.0)
        reported = loss.detach()
    per_modality = torch.zeros(len(MODALITIES), 2, dtype=torch.float64, device=losses.device)
    per_modality[:, 0].index_add_(0, target_modality.reshape(-1), (losses * mask).detach().reshape(-1).double())
    per_modality[:, 1].index_add_(0, target_modality.reshape(-1), mask.reshape(-1).double())
    # clone: the schedule scales the returned loss in place (micro-batches, CP size).
    return loss, {"lm loss": reported.clone(), "modality loss": per_modality}


def gpt_forward_step(
    data_iterator: Iterator[Dict[str, torch.Tensor]],
    model,
    loss_weights: Optional[torch.Tensor] = None,
    batch_hooks: Sequence[Callable] = (),
    rescale_modalities: bool = False,
):
    """Forward step for ``GPTModel``: returns per-token losses and the loss function to apply.

    Each of ``batch_hooks`` (the enabled capabilities', :func:`~megatron_ext.training.capabilities.batch_hooks`)
    is called as ``hook(model, batch)`` before the forward.
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = next(data_iterator)
    # Document masking: the whole sequence's document starts, the same on every CP rank (each core
    # attention finds its chunks' queries in it), handed over as the layers' attention mask.
    document_starts = batch.get("document_starts")
    if document_starts is not None:
        batch = {name: tensor for name, tensor in batch.items() if name != "document_starts"}
    cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        batch = get_batch_on_this_cp_rank(dict(batch), cp_group=cp_group)  # this rank's two chunks
    for hook in batch_hooks:
        hook(model, batch)
    output = model(  # loss_mask: what multi-token prediction's losses average over (unused without it)
        batch["tokens"],
        batch["position_ids"],
        attention_mask=document_starts,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, partial(
        masked_mean_loss, batch, loss_weights=loss_weights, cp_group=cp_group, rescale_modalities=rescale_modalities
    )


def run_forward_step(cfg, device: torch.device) -> Callable:
    """The forward step of a run: :func:`gpt_forward_step` with the data section's per-modality loss
    weights (and rescaling) and the enabled capabilities' batch hooks."""
    weights = cfg.data.loss_weights
    loss_weights = (
        None if weights is None else torch.tensor([weights.get(name, 1.0) for name in MODALITIES], device=device)
    )
    return partial(
        gpt_forward_step,
        loss_weights=loss_weights,
        batch_hooks=batch_hooks(cfg),
        rescale_modalities=cfg.data.modality_loss_rescaling,
    )


def global_batch_iterator(
    dataset, consumed_samples: int, cfg, num_chunks: int, device: torch.device, global_batch_size: Optional[int] = None
):
    """The data iterator(s) of one global batch for Megatron's schedule: this data-parallel rank's
    micro-batches from ``consumed_samples`` on, one iterator per model chunk when there are several.
    ``global_batch_size``: the samples of this global batch (a ramp-up's); None: ``train.global_batch_size``."""
    from megatron.core import parallel_state

    t = cfg.train
    batches = list(
        step_micro_batches(
            dataset,
            consumed_samples,
            t.global_batch_size if global_batch_size is None else global_batch_size,
            t.micro_batch_size,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            device=device,
        )
    )
    return [iter(batches) for _ in range(num_chunks)] if num_chunks > 1 else iter(batches)


@dataclass
class StepResult:
    """What one optimizer step reports on every rank."""

    loss: float
    """Mean LM loss over micro-batches (broadcast from the last pipeline stage)."""
    modality_losses: Dict[str, float]
    """``loss/<modality>``: mean unweighted loss of the tokens whose target is that modality."""
    grad_norm: float
    """Global gradient L2 norm before clipping."""
    update_successful: bool
    """False when the update was skipped (non-finite gradients)."""


def _reduce_step_losses(losses_reduced: List[dict]) -> Dict[str, float]:
    """``loss`` (mean over micro-batches and DP ranks) and ``loss/<modality>`` on every rank."""
    from megatron.core import parallel_state

    # [mean lm loss, then (sum, count) per modality]; only the last stage holds values.
    values = torch.zeros(1 + 2 * len(MODALITIES), dtype=torch.float64, device=comm_device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses_reduced:
        values[0] = torch.stack([d["lm loss"].double() for d in losses_reduced]).mean()
        if "modality loss" in losses_reduced[0]:
            values[1:] = torch.stack([d["modality loss"] for d in losses_reduced]).sum(0).reshape(-1)
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(dp_group) > 1:
        dist.all_reduce(values, group=dp_group)
        values[0] /= dist.get_world_size(dp_group)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        dist.all_reduce(values, group=pp_group)  # hands the last stage's values to every stage
    result = {"loss": float(values[0])}
    per_modality = values[1:].view(len(MODALITIES), 2)
    for name, (total, count) in zip(MODALITIES, per_modality.tolist()):
        if count > 0:
            result[f"loss/{name}"] = total / count
    return result


def _run_schedule(
    model, data_iterator, forward_step_func, num_microbatches, seq_length, micro_batch_size, forward_only: bool
) -> List[dict]:
    """Megatron's forward/backward schedule for the current parallel layout (1F1B, interleaved, ...)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


@contextlib.contextmanager
def _timed(timers, name: str):
    """Time the block as Megatron timer ``name`` (level 1) when ``timers`` is given."""
    if timers is None:
        yield
        return
    timers(name, log_level=1).start()
    try:
        yield
    finally:
        timers(name).stop()


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
    timers=None,
) -> StepResult:
    """Run one step over ``num_microbatches`` micro-batches on DDP-wrapped ``model`` chunks.

    ``timers``: Megatron-Core ``Timers`` (``logging.timers``): times the update with the LR schedule
    as ``optimizer`` (as Megatron-LM's training step does) and the reduction of the step's losses over
    ranks as ``loss-reduce``; the schedule times itself through the model config."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses_reduced = _run_schedule(
        model, data_iterator, forward_step_func, num_microbatches, seq_length, micro_batch_size, forward_only=False
    )
    with _timed(timers, "optimizer"):
        update_successful, grad_norm, _ = optimizer.step()
        if update_successful and opt_param_scheduler is not None:
            opt_param_scheduler.step(increment=increment)
    with _timed(timers, "loss-reduce"):
        losses = _reduce_step_losses(losses_reduced)
    loss = losses.pop("loss")
    return StepResult(
        loss=loss, modality_losses=losses, grad_norm=float(grad_norm), update_successful=update_successful
    )


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
    for chunk in model:
        chunk.eval()
    try:
        losses_reduced = _run_schedule(
            model, data_iterator, forward_step_func, num_microbatches, seq_length, micro_batch_size, forward_only=True
        )
    finally:
        for chunk in model:
            chunk.train()
    return _reduce_step_losses(losses_reduced)["loss"]
