"""Wrap model chunks in Megatron's DistributedDataParallel and wire the schedule's grad hooks."""

from __future__ import annotations

from typing import List

import torch


def wrap_with_ddp(
    model_chunks: List[torch.nn.Module],
    *,
    overlap_grad_reduce: bool = False,
    bucket_size: int | None = None,
    use_distributed_optimizer: bool = False,
) -> List[torch.nn.Module]:
    """Megatron DDP around each chunk, fp32 grad buffers, with ``finalize_model_grads`` hooked in.

    ``use_distributed_optimizer`` must match the optimizer's: Megatron's distributed optimizer
    shards its state over the data-parallel ranks and needs DDP to reduce-scatter the gradient
    buffers into matching shards (instead of all-reducing them).

    With ``overlap_grad_reduce`` the gradient all-reduce of a bucket starts as soon as its last
    gradient is ready, overlapping communication with the rest of backward; the schedule then
    needs ``no_sync_func`` / ``grad_sync_func`` to defer it to the last micro-batch.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Megatron-LM: only the first chunk is bucketed when chunks are interleaved.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(model_chunks)
    ]
    config = model_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in wrapped]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        grad_sync = [chunk.start_grad_sync for chunk in wrapped]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    return wrapped


def release_ddp(model: List[torch.nn.Module]) -> None:
    """Let a finished run's model (and the process groups it holds) be freed.

    Megatron's DDP keeps each parameter's gradient-accumulator node in ``grad_accs`` and registers on
    it a hook that refers back to the DDP module; and modules keep tensors of the last step with
    their autograd graph (the all-to-all token dispatcher's ``probs``), whose graph reaches those
    nodes. Both are cycles through C++ objects, which Python's garbage collector cannot see through:
    model, buffers and gloo groups (with their threads) would outlive the run. Dropping the nodes
    and the graph-holding attributes breaks them; the model cannot train afterwards.
    """
    for chunk in model:
        accumulators = getattr(chunk, "grad_accs", None)
        if accumulators is not None:
            accumulators.clear()
        for module in chunk.modules():
            for holder in (module, getattr(module, "token_dispatcher", None)):  # (a dispatcher is no Module)
                for name, value in list(vars(holder).items()) if holder is not None else ():
                    if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                        setattr(holder, name, None)
