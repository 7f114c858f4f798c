"""Elastic training (ERNIE 5.0, arXiv 2602.04705, section 3.3): a sampled sub-network per step.

Every step trains one sub-network with the ordinary LM loss in one backward pass (no
distillation) [paper]. Three independent draws per step:

    depth:    all layers with p = depth_full_prob, else a random subset of layers (order kept) of
              a size uniform in [depth_min_layers, num_layers - 1] [choice]
    width:    all experts with p = width_full_prob, else routing restricted to a random subset of
              width_num_experts experts ([choice] the same subset in every MoE layer)
    sparsity: the default top-k with p = topk_default_prob, else k uniform in [lo, hi)

[choice] The draws come from a generator seeded by ``(seed, step)`` only, so that every rank that
shares a forward (TP, PP, EP, CP groups, and DP ranks, which share the weights) draws the same
sub-network without communication, and a resumed run draws the same sequence.

Applying a sub-network to model chunks (:func:`apply`, undone by :func:`reset`):

* top-k and the active experts go to every :class:`~megatron_ext.moe.router.ElasticRouter`;
* a layer that is not kept becomes a pass-through for the step, returning ``(hidden_states,
  context)`` unchanged, and runs again after :func:`reset`
  (:func:`megatron_ext.compat.layers.skip_layer`: an instance-level ``forward``, which works for
  any subclass of ``TransformerLayer``, a looped layer or a hybrid-attention layer, without
  rebuilding the block).

Pipeline parallelism: every stage applies the same sub-network to its own layers (global index
``layer.layer_number - 1``); a stage whose layers are all skipped passes its input on. Expert
parallelism: all EP ranks skip the same layers and use the same k, so the alltoall collectives
of the layers that run stay in step.

A skipped layer's parameters get no gradient in that step (zeros in Megatron's gradient buffer);
the optimizer still applies weight decay and momentum to them, as to any parameter. Under DDP with
overlapped gradient reduction they get an explicit zero gradient instead, so that their buckets
complete (``skip_layer(layer, zero_grads=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch

from megatron_ext.compat.layers import skip_layer, unskip_layer
from megatron_ext.moe.config import ElasticConfig

__all__ = ["ElasticSampler", "SubNetwork", "apply", "decoder_layers", "reset"]


@dataclass(frozen=True)
class SubNetwork:
    """The sub-network of one step."""

    layers: Tuple[int, ...]
    """Kept global layer indices (0-based), ascending; never empty."""
    experts: Optional[Tuple[int, ...]]
    """Experts routing may use, ascending; None: all."""
    top_k: Optional[int]
    """Experts per token; None: the model's default."""

    def is_full(self, num_layers: int, default_top_k: int) -> bool:
        return len(self.layers) == num_layers and self.experts is None and self.top_k == default_top_k


class ElasticSampler:
    """Draws the sub-network of a step from ``(seed, step)`` alone (no state, no communication).

    Args:
        config: the ``elastic`` section.
        num_layers: decoder layers of the whole model.
        num_experts: routed experts per MoE layer.
        top_k: the model's default experts per token.
        seed: the run's seed (``config.seed_offset`` is added).
    """

    def __init__(self, config: ElasticConfig, num_layers: int, num_experts: int, top_k: int, seed: int):
        problems = config.problems_with_model(num_layers, num_experts, top_k)
        if problems:
            raise ValueError("; ".join(problems))
        if seed < 0:
            raise ValueError(f"seed={seed} is not allowed for the sub-network stream: use a seed >= 0")
        self.config = config
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.seed = seed + config.seed_offset

    def full(self) -> SubNetwork:
        """The whole network."""
        return SubNetwork(layers=tuple(range(self.num_layers)), experts=None, top_k=self.top_k)

    def sample(self, step: int, config: Optional[ElasticConfig] = None) -> SubNetwork:
        """The sub-network of optimizer step ``step`` (1-based: the step about to be trained), drawn with
        the probabilities of ``config`` (a stage's elastic section; None: the sampler's own)."""
        if step < 0:
            raise ValueError(f"step={step} is not allowed: use a step >= 0")
        c = self.config if config is None else config
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
        layers = tuple(range(self.num_layers))
        if rng.random() >= c.depth_full_prob:
            size = int(rng.integers(c.depth_min_layers, self.num_layers))  # in [min, L - 1]
            layers = tuple(sorted(int(i) for i in rng.choice(self.num_layers, size=size, replace=False)))
        experts = None
        if rng.random() >= c.width_full_prob:
            size = c.width_size(self.num_experts)
            experts = tuple(sorted(int(i) for i in rng.choice(self.num_experts, size=size, replace=False)))
        top_k = self.top_k
        if rng.random() >= c.topk_default_prob:
            lo, hi = c.topk_bounds(self.top_k)
            top_k = int(rng.integers(lo, hi))
        return SubNetwork(layers=layers, experts=experts, top_k=top_k)


# -- applying a sub-network to model chunks -----------------------------------------------------


def decoder_layers(model_chunks: Iterable[torch.nn.Module]) -> List[torch.nn.Module]:
    """The decoder's ``TransformerLayer``s of the (DDP-wrapped or bare) chunks of this rank."""
    from megatron.core.utils import get_attr_wrapped_model

    layers = []
    for chunk in model_chunks:
        decoder = get_attr_wrapped_model(chunk, "decoder")
        if decoder is not None:
            layers.extend(decoder.layers)
    return layers


def apply(model_chunks: Iterable[torch.nn.Module], sub: SubNetwork) -> None:
    """Make the chunks of this rank compute ``sub`` until :func:`reset`.

    Sets every router's top-k (and ``config.moe_router_topk``) and active experts, and turns the
    decoder layers not in ``sub.layers`` into pass-throughs.
    """
    from megatron_ext.moe.router import elastic_routers, set_router_topk

    model_chunks = list(model_chunks)
    reset(model_chunks)
    routers = elastic_routers(model_chunks)
    set_router_topk(routers, sub.top_k)
    if sub.experts is not None:
        for router in routers:
            mask = torch.zeros(router.num_experts, dtype=torch.bool)
            mask[list(sub.experts)] = True
            router.set_active_experts(mask)
    kept = set(sub.layers)
    for chunk in model_chunks:
        overlapped = getattr(getattr(chunk, "ddp_config", None), "overlap_grad_reduce", False)
        for layer in decoder_layers([chunk]):
            if layer.layer_number - 1 not in kept:
                skip_layer(layer, zero_grads=overlapped)


def reset(model_chunks: Iterable[torch.nn.Module]) -> None:
    """Restore the full network: default top-k, all experts, every layer runs."""
    from megatron_ext.moe.router import elastic_routers, set_router_topk

    model_chunks = list(model_chunks)
    routers = elastic_routers(model_chunks)
    for router in routers:
        router.set_active_experts(None)
    set_router_topk(routers, None)
    for layer in decoder_layers(model_chunks):
        unskip_layer(layer)
