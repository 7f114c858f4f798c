"""Assemble the full (unsharded) tensors of a model from its tensor / pipeline / expert shards.

Names are made global: ``decoder.layers.{i}`` gets the stage's layer offset and
``experts.local_experts.{j}`` the rank's first expert index, so the result of a TP=2 x PP=2 x EP=2
model has exactly the keys and values of the same model built on one rank. Used for parity tests,
export and sub-model extraction; it gathers everything to every rank, so it is meant for models
that fit in one process's memory.

Tensor-parallel layout (Megatron's ``_initialize_affine_weight_cpu``): the full weight is split
along ``partition_dim`` into ``stride * tp`` equal chunks and rank r holds chunks
``r, r + tp, r + 2 tp, ...`` (stride 2 for SwiGLU's fused [gate, up] fc1).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"(\.local_experts\.)(\d+)\.")


def merge_tensor_parallel_shards(shards, partition_dim: int, stride: int) -> torch.Tensor:
    """Inverse of Megatron's strided split: ``shards[r]`` is rank r's local tensor."""
    pieces = [shard.chunk(stride, dim=partition_dim) for shard in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(shards))], dim=partition_dim)


def _tp_group(param: torch.nn.Parameter) -> Optional[dist.ProcessGroup]:
    """The group ``param`` is sharded over, or None if it is replicated."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return None
    if not getattr(param, "allreduce", True):  # expert weights: expert-tensor-parallel group
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _gather_tp(tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    group = _tp_group(param)
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return merge_tensor_parallel_shards(shards, param.partition_dim, getattr(param, "partition_stride", 1))


def _split_tp(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    group = _tp_group(param)
    if group is None or dist.get_world_size(group) == 1:
        return full
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = full.chunk(getattr(param, "partition_stride", 1) * world, dim=param.partition_dim)
    return torch.cat(chunks[rank::world], dim=param.partition_dim)


def _global_name(name: str, layer_offset: int, expert_offset: int) -> str:
    name = _LAYER.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + layer_offset}.", name, count=1)
    return _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + expert_offset}.", name, count=1)


def _global_named_parameters(model: torch.nn.Module, layer_offset: Optional[int]):
    """``(global_name, param)`` for every local parameter of one model chunk (DDP unwrapped)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    module = getattr(model, "module", model)
    config = module.config
    if layer_offset is None:  # a virtual-pipeline chunk knows its stage
        layer_offset = get_transformer_layer_offset(config, vp_stage=getattr(module, "vp_stage", None))
    num_experts = getattr(config, "num_moe_experts", None) or 0
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    expert_offset = ep_rank * (num_experts // ep_size) if num_experts else 0
    for name, param in module.named_parameters():
        yield _global_name(name, layer_offset, expert_offset), param


def full_named_tensors(
    model: torch.nn.Module,
    select: Callable[[torch.nn.Parameter], Optional[torch.Tensor]] = lambda p: p.data,
    layer_offset: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Full tensors of every parameter of ``model`` (one pipeline chunk), keyed by global name.

    ``select`` picks what to gather per parameter (``p.data`` by default; e.g. ``main_grad``);
    parameters for which it returns None are left out. Must be called on every rank.
    """
    local: Dict[str, torch.Tensor] = {}
    for name, param in _global_named_parameters(model, layer_offset):
        tensor = select(param)
        if tensor is not None:
            local[name] = _gather_tp(tensor.detach(), param).clone()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged: Dict[str, torch.Tensor] = {}
    for part in gathered:
        for name, tensor in part.items():
            merged.setdefault(name, tensor)
    return dict(sorted(merged.items()))


@torch.no_grad()
def load_full_named_tensors(
    model: torch.nn.Module, tensors: Dict[str, torch.Tensor], layer_offset: Optional[int] = None
) -> None:
    """Copy full tensors (as returned by :func:`full_named_tensors`) into this rank's shards."""
    for name, param in _global_named_parameters(model, layer_offset):
        if name not in tensors:
            raise KeyError(f"no tensor named {name!r} to load into this model's parameter")
        shard = _split_tp(tensors[name], param)
        if shard.shape != param.shape:
            raise ValueError(
                f"{name}: full tensor gives a shard of shape {tuple(shard.shape)}, "
                f"the parameter has {tuple(param.shape)}"
            )
        param.data.copy_(shard)


def main_grad_or_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """``select`` for gradients: DDP's ``main_grad`` if present, else ``.grad``."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad
