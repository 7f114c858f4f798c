"""AdamW for Megatron models on CPU, where Megatron's optimizer wrappers (CUDA-only) cannot run.

It keeps the contract of Megatron's ``MegatronOptimizer`` that the training loop relies on:

* gradients come from Megatron DDP's ``param.main_grad`` buffers (fp32), not ``param.grad``;
* ``step()`` clips by the global L2 norm over every model-parallel rank and returns
  ``(update_successful, grad_norm, num_zeros_in_grad)``; a non-finite norm skips the update;
* param groups come from Megatron's own grouping (no weight decay for biases and 1-D params,
  expert-parallel params in their own groups) and carry ``max_lr`` / ``min_lr`` / ``wd_mult`` /
  ``lr_mult`` so Megatron's ``OptimizerParamScheduler`` drives them unchanged.

Global norm (as Megatron's ChainedOptimizer does for dense + expert optimizers):
    ||g||^2 = sum_{dense, counted once} g^2   reduced over the TP x PP group
            + sum_{expert, counted once} g^2  reduced over the expert TP x EP x PP group
Gradients are already summed over data-parallel ranks by DDP, so DP is not reduced again.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_ext.parallel.weights import main_grad_or_grad


def _counted_once(param: torch.nn.Parameter) -> bool:
    """True if this rank owns ``param`` for norm purposes (not a TP duplicate, not a tied copy)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    return param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param)


def global_grad_norm(
    params: Iterable[torch.nn.Parameter],
    dense_group: Optional[dist.ProcessGroup],
    expert_group: Optional[dist.ProcessGroup],
) -> float:
    """L2 norm of all gradients of the model across every model-parallel rank (see module doc)."""
    sq = torch.zeros(2, dtype=torch.float64)  # [dense, expert]
    for param in params:
        grad = main_grad_or_grad(param)
        if grad is None or not _counted_once(param):
            continue
        is_expert = not getattr(param, "allreduce", True)
        sq[int(is_expert)] += grad.detach().double().pow(2).sum()
    dense_sq, expert_sq = sq[0:1].clone(), sq[1:2].clone()
    if dense_group is not None and dist.get_world_size(dense_group) > 1:
        dist.all_reduce(dense_sq, group=dense_group)
    if expert_group is not None and dist.get_world_size(expert_group) > 1:
        dist.all_reduce(expert_sq, group=expert_group)
    return math.sqrt(float(dense_sq + expert_sq))


class CPUAdamW:
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) over Megatron param groups."""

    def __init__(
        self,
        param_groups: List[dict],
        *,
        lr: float,
        weight_decay: float,
        betas: Tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        clip_grad: float = 1.0,
        dense_group: Optional[dist.ProcessGroup] = None,
        expert_group: Optional[dist.ProcessGroup] = None,
    ):
        for group in param_groups:
            group.setdefault("wd_mult", 1.0)
            group.setdefault("lr_mult", 1.0)
            group["lr"] = lr * group["lr_mult"]
            group["weight_decay"] = weight_decay * group["wd_mult"]
        groups = [g for g in param_groups if g["params"]]
        # fused AdamW is the fastest CPU implementation in torch (single pass per tensor).
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        self.clip_grad = clip_grad
        self.dense_group = dense_group
        self.expert_group = expert_group

    @property
    def param_groups(self) -> List[dict]:
        return self.optimizer.param_groups

    def _params(self) -> Sequence[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop ``param.grad``; DDP's ``zero_grad_buffer()`` clears ``main_grad``."""
        for param in self._params():
            param.grad = None

    @torch.no_grad()
    def step(self) -> Tuple[bool, float, Optional[int]]:
        """Clip by global norm and update; skip (return False) when the norm is not finite."""
        params = self._params()
        grad_norm = global_grad_norm(params, self.dense_group, self.expert_group)
        if not math.isfinite(grad_norm):
            self.zero_grad()
            return False, grad_norm, None
        scale = 1.0
        if self.clip_grad > 0 and grad_norm > self.clip_grad:
            scale = self.clip_grad / (grad_norm + 1e-6)
        for param in params:
            grad = main_grad_or_grad(param)
            if grad is None:
                continue
            grad = grad.to(param.dtype)
            param.grad = grad * scale if scale != 1.0 else grad
        self.optimizer.step()
        self.zero_grad()
        return True, grad_norm, None

    def _init_state(self) -> None:
        """Create zero moments where Adam has none yet, so a checkpoint has a place to load into."""
        for param in self._params():
            state = self.optimizer.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """Optimizer state for ``dist_checkpointing``: each moment shards like its parameter.

        As Megatron's FP32Optimizer: the per-parameter ``step`` (equal for all) is saved once as
        ``common_step``, and moments are mapped onto the parameters' ShardedTensors, so they
        reshard with the model.
        """
        from itertools import chain

        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        self._init_state()
        state_dict = self.optimizer.state_dict()
        steps = {float(s["step"]) for s in state_dict["state"].values()}
        if len(steps) > 1:
            raise RuntimeError(f"parameters are at different optimizer steps {sorted(steps)}")
        id_to_sharded_param = get_param_id_to_sharded_param_map(
            model_sharded_state_dict, chain.from_iterable(g["params"] for g in self.optimizer.param_groups)
        )
        common_step = next(iter(state_dict["state"].values()))["step"].clone() if steps else None
        optim_state_to_sharding_state(state_dict, id_to_sharded_param, exclude_keys="step")
        if common_step is not None:
            state_dict["state"]["common_step"] = common_step
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict, state=dict(state_dict["state"]))
        common_step = state_dict["state"].pop("common_step", None)
        if common_step is not None:
            for param_state in state_dict["state"].values():
                param_state["step"] = common_step.clone()
        self.optimizer.load_state_dict(state_dict)
