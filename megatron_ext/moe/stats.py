"""Expert-load statistics: per-layer balance, per-modality usage, overlap of modalities' experts.

Formulas, for one layer with ``N`` experts and ``c_i`` tokens routed to expert ``i``
(a token routed to k experts counts once for each):

    CV = std(c) / mean(c)                                  (population std; 0 = perfectly balanced)
    NE = -sum_i p_i ln p_i / ln N,   p_i = c_i / sum_j c_j  (0 ln 0 = 0; 1 = perfectly balanced)

NE and the IoU of two modalities' top-25% experts are the routing analysis of ERNIE 5.0
(arXiv 2602.04705) [paper]: IoU(A, B) = |T_A ∩ T_B| / |T_A ∪ T_B|, where T_m holds the ceil(N / 4)
experts that received most tokens of modality m (the ceil is our [choice]).

:class:`LoadTracker` counts, during the forward, the tokens each router sends to each expert per
modality, and reduces the counts at the end of the step into one ``[num_layers, M + 1, N]``
tensor that every rank holds (row ``M``: tokens whose modality was not handed to the router).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ext.data.vocab import MODALITIES
from megatron_ext.parallel.state import comm_device

__all__ = ["LoadTracker", "layer_metrics", "load_cv", "normalized_entropy", "top_experts", "top_experts_iou"]


def load_cv(counts: Tensor) -> Tensor:
    """Coefficient of variation of ``counts [..., N]`` over the last dim: std / mean (0 if empty)."""
    c = counts.double()
    mean = c.mean(-1)
    std = c.std(-1, unbiased=False)
    return torch.where(mean > 0, std / mean.clamp(min=1e-30), torch.zeros_like(mean))


def normalized_entropy(counts: Tensor) -> Tensor:
    """``-sum p ln p / ln N`` of ``counts [..., N]`` over the last dim (N > 1; 0 if empty)."""
    c = counts.double()
    n = c.size(-1)
    if n < 2:
        raise ValueError(f"normalized entropy needs at least 2 experts, got {n}")
    total = c.sum(-1, keepdim=True)
    p = c / total.clamp(min=1e-30)
    plogp = torch.where(p > 0, p * p.clamp(min=1e-300).log(), torch.zeros_like(p))
    return -plogp.sum(-1) / math.log(n)


def top_experts(counts: Tensor, fraction: float = 0.25) -> List[int]:
    """Indices of the ceil(fraction * N) experts with most tokens in ``counts [N]`` (ties: lower index)."""
    n = counts.numel()
    k = max(1, math.ceil(fraction * n))
    order = sorted(range(n), key=lambda i: (-float(counts[i]), i))
    return sorted(order[:k])


def top_experts_iou(counts_a: Tensor, counts_b: Tensor, fraction: float = 0.25) -> float:
    """IoU of the top-``fraction`` experts of two modalities' counts ``[N]`` (ERNIE 5.0's overlap [paper])."""
    a, b = set(top_experts(counts_a, fraction)), set(top_experts(counts_b, fraction))
    return len(a & b) / len(a | b)


class LoadTracker:
    """Per-layer, per-modality expert counts of one step, from forward hooks on the routers.

    Counting follows Megatron's ``local_tokens_per_expert``: only forwards in training mode with
    gradients enabled count (not evaluation; under full activation recomputation, the forward
    recomputed in backward, whose modality ids may already be the next micro-batch's in 1F1B,
    so per-modality rows are then approximate while the totals are exact). The hook reads the
    ``routing_map`` the router returns; it runs under ``no_grad`` and costs one ``index_add_``.

    Args:
        routers: this rank's :class:`~megatron_ext.moe.router.ElasticRouter`s.
        num_layers: decoder layers of the whole model (rows of the reduced counts).
        num_experts: experts per MoE layer.
        reduce_group: the group whose ranks see different tokens of the same layers: tensor x
            context x data parallel (expert parallelism lies inside it), as for Megatron's
            expert-bias all-reduce.
        pp_group: the pipeline group, whose stages hold different layers.
    """

    def __init__(
        self,
        routers: Sequence,
        num_layers: int,
        num_experts: int,
        reduce_group: Optional[dist.ProcessGroup],
        pp_group: Optional[dist.ProcessGroup],
    ):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.reduce_group = reduce_group
        self.pp_group = pp_group
        self.unknown_row = len(MODALITIES)
        device = routers[0].weight.device if routers else comm_device()  # a router-less stage still reduces
        self.counts = torch.zeros(num_layers, len(MODALITIES) + 1, num_experts, dtype=torch.long, device=device)
        """This rank's counts of the current step, ``[num_layers, M + 1, N]``."""
        self.requested = torch.zeros(num_layers, dtype=torch.long, device=device)
        """This rank's token-expert assignments asked for (tokens x top-k) per layer in the step;
        ``counts`` holds those kept (fewer when capacity drops some)."""
        self._handles = [router.register_forward_hook(self._hook) for router in routers]

    def _hook(self, router, args, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        with torch.no_grad():
            _, routing_map = output  # [s*b, N] bool
            seq_length, batch_size = args[0].shape[:2]
            ids = router.token_modality_ids(seq_length, batch_size)
            if ids is None:
                ids = torch.full((routing_map.size(0),), self.unknown_row, dtype=torch.long, device=routing_map.device)
            self.counts[router.layer_index].index_add_(0, ids.long(), routing_map.long())
            self.requested[router.layer_index] += routing_map.size(0) * router.topk

    def reduce(self) -> Tensor:
        """The step's counts over all ranks, ``[num_layers, M + 1, N]`` on every rank; restarts counting.
        The assignments asked for, reduced alike, are then in :attr:`step_requested` ``[num_layers]``."""
        flat = torch.cat([self.counts.flatten(), self.requested])
        self.counts.zero_()
        self.requested.zero_()
        for group in (self.reduce_group, self.pp_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        self.step_requested = flat[self.counts.numel() :]
        return flat[: self.counts.numel()].view(self.counts.shape)

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def layer_metrics(counts: Tensor, active_experts: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Mean over the layers that routed tokens of CV and NE of ``counts [L, N]`` (active experts only)."""
    if active_experts is not None:
        counts = counts[:, list(active_experts)]
    routed = counts.sum(-1) > 0
    if not routed.any():
        return {}
    counts = counts[routed]
    return {"load_cv": float(load_cv(counts).mean()), "load_ne": float(normalized_entropy(counts).mean())}


def routing_statistics(
    counts: Tensor, active_experts: Optional[Sequence[int]] = None, fraction: float = 0.25
) -> Dict[str, float]:
    """Per-step routing statistics of ``counts [L, M + 1, N]`` (layers x modalities + unknown x
    experts; :class:`LoadTracker`), over the active experts, for the layers that routed tokens:

    * ``ne/<layer>``: normalised entropy of the layer's expert load (1 = balanced);
    * ``ne/<modality>``: of each modality's load, mean over layers;
    * ``iou/<a>_<b>``: IoU of two modalities' top-``fraction`` experts, mean over layers (ERNIE 5.0's
      overlap measure [paper]; modality-agnostic routing lets modalities share experts);
    * ``load_max_over_mean``: the busiest expert's load over the mean load, mean over layers.
    """
    if active_experts is not None:
        counts = counts[..., list(active_experts)]
    totals = counts.sum(1)  # [L, N]
    routed = [layer for layer in range(counts.shape[0]) if totals[layer].sum() > 0]
    out: Dict[str, float] = {}
    if not routed:
        return out
    for layer in routed:
        out[f"ne/{layer}"] = float(normalized_entropy(totals[layer]))
    loads = totals[routed].double()
    out["load_max_over_mean"] = float((loads.max(-1).values / loads.mean(-1)).mean())
    present = {m: [layer for layer in routed if counts[layer, m].sum() > 0] for m in range(len(MODALITIES))}
    for m, layers in present.items():
        if layers:
            out[f"ne/{MODALITIES[m]}"] = float(normalized_entropy(counts[layers, m]).mean())
    names = [m for m, layers in present.items() if layers]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = [layer for layer in present[a] if layer in present[b]]
            if both:
                iou = [top_experts_iou(counts[layer, a], counts[layer, b], fraction) for layer in both]
                out[f"iou/{MODALITIES[a]}_{MODALITIES[b]}"] = sum(iou) / len(iou)
    return out
