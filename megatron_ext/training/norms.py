"""Parameter and gradient norms (``logging.norm_interval``): the whole model's and each layer's.

A parameter belongs to transformer layer ``layer_number - 1`` (Megatron's global, 1-based layer
number, so pipeline stages agree) or to the rest (embeddings, final norm, output layer, MTP). Each
rank sums the squares of what it holds once, as Megatron's gradient norm does: a tensor-parallel
duplicate (a norm's weight) is counted on tensor-parallel rank 0 only, the last stage's copy of tied
embeddings not at all. One all-reduce over the model-parallel group (TP x PP) adds the dense
parameters' sums, one over the expert-tensor-model-pipeline group (ETP x EP x PP) the routed
experts' (its ranks hold distinct shards, experts or layers; expert data-parallel ranks hold
copies). Gradients are the reduced ones DDP leaves in ``main_grad`` after the step, before
clipping; with Megatron's distributed optimizer a rank holds only its shard of them, which the run
checks refuse.

Metrics: ``norm/param`` (all parameters), ``norm/layer_param`` and ``norm/layer_grad`` (lists, one
value per layer: ``norm/layer_grad/<layer>`` in TensorBoard).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron_ext.parallel import main_grad_or_grad


def _classify(model: List[torch.nn.Module]) -> Tuple[Dict[int, int], set]:
    """``(id(param) -> layer index`` of the parameters of transformer layers, ``ids of the routed
    experts' parameters)``."""
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layer_of, experts = {}, set()
    for chunk in model:
        for module in chunk.modules():
            if isinstance(module, TransformerLayer):
                for param in module.parameters():
                    layer_of[id(param)] = module.layer_number - 1
            if isinstance(module, (GroupedMLP, SequentialMLP, TEGroupedMLP)):
                experts.update(id(param) for param in module.parameters())
    return layer_of, experts


class NormTracker:
    """Computes the norms of ``model`` (DDP-wrapped chunks) with ``num_layers`` layers in all."""

    def __init__(self, model: List[torch.nn.Module], num_layers: int, has_experts: bool, device: torch.device):
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        self.num_layers, self.device = num_layers, device
        self.mp_group = parallel_state.get_model_parallel_group()
        self.expert_group = parallel_state.get_expert_tensor_model_pipeline_parallel_group() if has_experts else None
        layer_of, experts = _classify(model)
        # (param, slot, is_expert): slot num_layers is "the rest". The members of the expert group
        # (ETP x EP x PP) hold distinct shards, experts or layers: an expert parameter always counts.
        self.params: List[Tuple[torch.nn.Parameter, int, bool]] = [
            (param, min(layer_of.get(id(param), num_layers), num_layers), id(param) in experts)
            for chunk in model
            for param in chunk.parameters()
            if param_is_not_shared(param) and (id(param) in experts or param_is_not_tensor_parallel_duplicate(param))
        ]

    @torch.no_grad()
    def metrics(self) -> Dict[str, object]:
        slots = self.num_layers + 1
        # [dense | expert] x [param squares per slot | grad squares per slot]
        sums = torch.zeros(2, 2, slots, dtype=torch.float64, device=self.device)
        for param, slot, is_expert in self.params:
            sums[int(is_expert), 0, slot] += param.detach().double().pow(2).sum().to(self.device)
            grad = main_grad_or_grad(param)
            if grad is not None:
                sums[int(is_expert), 1, slot] += grad.detach().double().pow(2).sum().to(self.device)
        dense, expert = sums[0].contiguous(), sums[1].contiguous()
        dist.all_reduce(dense, group=self.mp_group)
        if self.expert_group is not None:
            dist.all_reduce(expert, group=self.expert_group)
            dense += expert
        norms = dense.sqrt()  # [2, slots]
        return {
            "norm/param": float(dense[0].sum().sqrt()),
            "norm/layer_param": [round(float(v), 6) for v in norms[0, : self.num_layers]],
            "norm/layer_grad": [round(float(v), 6) for v in norms[1, : self.num_layers]],
        }
