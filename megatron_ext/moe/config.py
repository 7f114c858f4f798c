"""The ``moe``, ``routing`` and ``elastic`` sections of the run config (ERNIE 5.0 MoE, arXiv 2602.04705).

Plain dataclasses without torch or Megatron imports. Checks that need the model's shape (layers,
experts, top-k) are in ``problems_with_model``, for the cross-section checks;
:class:`~megatron_ext.moe.elastic.ElasticSampler` applies them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

from megatron_ext.config import MODALITIES, Checks

ROUTING_MODES = ("agnostic", "modality_isolated")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture-of-experts MLPs (Megatron MoELayer with the alltoall dispatcher)."""

    enabled: bool = False
    """Replace dense MLPs by MoE layers."""
    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts per token."""
    expert_ffn_hidden_size: int = 64
    """Inner size of each routed expert (fine-grained experts are narrow)."""
    shared_expert_ffn_hidden_size: Optional[int] = None
    """Inner size of the always-on shared expert(s); None: no shared expert."""
    first_k_dense: int = 0
    """The first k layers keep a dense MLP."""
    layer_pattern: Optional[List[int]] = None
    """Explicit per-layer pattern, 1 = MoE, 0 = dense (overrides first_k_dense)."""
    capacity_factor: Optional[float] = None
    """Token capacity per expert as a multiple of the balanced load; None: dropless."""
    load_balancing: Literal["none", "aux_loss", "seq_aux_loss"] = "none"
    """Auxiliary load-balancing loss (for comparison; ERNIE 5.0 uses none + expert bias [paper])."""
    aux_loss_coeff: float = 0.0
    """Weight of the auxiliary load-balancing loss."""
    z_loss_coeff: Optional[float] = None
    """Weight of the router z-loss; None disables it."""
    score_function: Literal["softmax", "sigmoid"] = "sigmoid"
    """Router score function (sigmoid, as DeepSeek-V3, arXiv 2412.19437: what auxiliary-loss-free
    expert bias needs)."""
    router_pre_softmax: bool = False
    """softmax only: select the top-k of the softmax over all experts (Megatron's
    ``moe_router_pre_softmax``) instead of a softmax over the k selected scores; needed for
    ``top_k: 1``, where a softmax over one score is constantly 1 and gives the router no gradient."""

    def __post_init__(self):
        c = Checks(self)
        c.positive("num_experts", "top_k", "expert_ffn_hidden_size", "shared_expert_ffn_hidden_size", "capacity_factor")
        c.non_negative("first_k_dense", "aux_loss_coeff", "z_loss_coeff")
        c.require(self.top_k <= self.num_experts, f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.layer_pattern is not None:
            c.require(
                all(v in (0, 1) for v in self.layer_pattern),
                f"layer_pattern={self.layer_pattern} may only hold 0 (dense) and 1 (MoE)",
            )
        if self.load_balancing != "none":
            c.require(
                self.aux_loss_coeff > 0,
                f"aux_loss_coeff={self.aux_loss_coeff} must be > 0 with load_balancing={self.load_balancing!r}",
            )
        c.done()

    def layer_pattern_for(self, num_layers: int) -> List[int]:
        """1 where layer i is an MoE layer, 0 where it keeps a dense MLP (all 0 when disabled)."""
        if not self.enabled:
            return [0] * num_layers
        if self.layer_pattern is not None:
            return list(self.layer_pattern)
        return [0 if i < self.first_k_dense else 1 for i in range(num_layers)]


@dataclass(kw_only=True)
class ElasticConfig:
    """Elastic training (ERNIE 5.0 section 3.3) [paper]: every step trains a sampled sub-network.

    Per step, independently: depth (which layers run), width (which experts may be routed to) and
    sparsity (top-k). [choice] The sub-network is drawn from ``(train.seed + seed_offset, step)`` only, so
    every rank draws the same one without communication and a resumed run the same sequence.
    """

    enabled: bool = False
    """Sample a sub-network every step (False: always the full network)."""
    depth_full_prob: float = 0.75
    """Probability of the full depth in a step. 0.75 is the paper's value [paper]; its depth ablation
    (16 layers) reports 0.8, which is within the paper's own range of settings."""
    width_full_prob: float = 0.8
    """Probability that routing may use all experts in a step; 0.8 [paper]."""
    topk_default_prob: float = 0.8
    """Probability of the model's default top-k in a step; 0.8 [paper]."""
    depth_min_layers: int = 1
    """Fewest layers of a depth-reduced sub-network; [choice] its size is uniform in
    [depth_min_layers, num_layers - 1]."""
    width_num_experts: Optional[int] = None
    """Experts of a width-reduced sub-network ([choice] a uniformly random subset of that size, the
    same in every MoE layer); [choice] None: half of the experts. Must be at least the model's top-k."""
    topk_range: Optional[List[int]] = None
    """``[lo, hi)``: a reduced top-k is uniform in ``range(lo, hi)`` [choice]; None: ``[1, top_k)``
    [paper]."""
    seed_offset: int = 0
    """Added to the run's seed for the sub-network stream (0: train.seed itself)."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.one_of("enabled", (True, False))
        for name in ("depth_full_prob", "width_full_prob", "topk_default_prob"):
            c.within(name, 0.0, 1.0)
        c.require(
            _is_int(self.depth_min_layers) and self.depth_min_layers >= 1,
            f"depth_min_layers={self.depth_min_layers!r} is not allowed: it must be an int >= 1",
        )
        c.require(
            self.width_num_experts is None or (_is_int(self.width_num_experts) and self.width_num_experts >= 1),
            f"width_num_experts={self.width_num_experts!r} is not allowed: use null or an int >= 1",
        )
        r = self.topk_range
        c.require(
            r is None
            or (isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_int(v) for v in r) and 1 <= r[0] < r[1]),
            f"topk_range={r!r} is not allowed: use null or [lo, hi) with 1 <= lo < hi (ints)",
        )
        c.require(
            _is_int(self.seed_offset) and self.seed_offset >= 0,
            f"seed_offset={self.seed_offset!r} is not allowed: it must be an int >= 0",
        )
        c.done()
        if self.topk_range is not None:
            self.topk_range = list(self.topk_range)

    def width_size(self, num_experts: int) -> int:
        """Experts of a width-reduced sub-network."""
        return self.width_num_experts if self.width_num_experts is not None else num_experts // 2

    def topk_bounds(self, top_k: int) -> Tuple[int, int]:
        """``(lo, hi)`` of a reduced top-k, sampled from ``range(lo, hi)``."""
        return tuple(self.topk_range) if self.topk_range is not None else (1, top_k)

    def problems_with_model(self, num_layers: int, num_experts: int, top_k: int) -> List[str]:
        """Problems that need the model's shape (for the cross-section checks); empty when none."""
        problems: List[str] = []
        if self.depth_full_prob < 1.0 and not self.depth_min_layers <= num_layers - 1:
            problems.append(
                f"elastic.depth_min_layers={self.depth_min_layers} is not allowed with "
                f"model.num_layers={num_layers}: a reduced depth keeps between depth_min_layers "
                f"and num_layers - 1 = {num_layers - 1} layers (or set depth_full_prob: 1)"
            )
        width = self.width_size(num_experts)
        if self.width_full_prob < 1.0 and not top_k <= width < num_experts:
            problems.append(
                f"elastic.width_num_experts={width} (null = half of moe.num_experts={num_experts}) "
                f"is not allowed: a reduced width keeps between moe.top_k={top_k} and "
                f"{num_experts - 1} experts (or set width_full_prob: 1)"
            )
        lo, hi = self.topk_bounds(top_k)
        if self.topk_default_prob < 1.0 and not (1 <= lo < hi <= top_k):
            problems.append(
                f"elastic.topk_range=[{lo}, {hi}) is not allowed with moe.top_k={top_k}: a reduced "
                f"top-k lies in [1, top_k) (or set topk_default_prob: 1)"
            )
        return problems


@dataclass(kw_only=True)
class RoutingConfig:
    """How tokens choose experts, and how expert load is balanced."""

    mode: Literal["agnostic", "modality_isolated"] = "agnostic"
    """``agnostic`` (ERNIE 5.0) [paper]: one router over one expert pool for every token, conditioned
    on the hidden state only. ``modality_isolated`` (the ERNIE 4.5 baseline) [paper]: the experts are
    split ([choice]) into equal contiguous partitions, one per modality of ``isolated_modalities``,
    and a token may only select experts of its modality's partition."""
    isolated_modalities: Optional[List[str]] = None
    """``modality_isolated`` only: the modalities that get a partition, in expert order; None: all
    of ``MODALITIES``. A token of another modality is an error."""
    expert_bias: bool = True
    """Auxiliary-loss-free balancing (DeepSeek-V3) [paper]: a per-expert bias added to the scores for
    the top-k selection only, moved by ``bias_update_rate`` toward balance after every step. Needs
    ``moe.score_function: sigmoid``."""
    bias_update_rate: float = 1e-4
    """Step of the bias update: 1e-4 in ERNIE 5.0 pre-training, 1e-5 later [paper]."""
    bias_update_rate_schedule: Optional[List[List[float]]] = None
    """Piecewise-constant rate: ``[[step, rate], ...]`` with ascending steps, the rate of the last
    entry whose step is <= the current step (``bias_update_rate`` before the first), e.g.
    ``[[100000, 1.0e-5]]`` for ERNIE 5.0's 1e-4 -> 1e-5 [paper; the switch step is a choice].
    None: ``bias_update_rate`` throughout."""
    normalize_top1: bool = True
    """Sigmoid routing: the gates of a token's selected experts are its scores divided by their sum
    for every top-k, also k = 1 (gate 1.0), as DeepSeek-V3 normalises (arXiv 2412.19437); False keeps
    Megatron-Core's rule, the raw score at k = 1, under which the MoE output's scale jumps whenever
    elastic training samples k = 1. [choice]"""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.one_of("mode", ROUTING_MODES)
        names = self.isolated_modalities
        c.require(
            names is None
            or (
                isinstance(names, (list, tuple))
                and bool(names)
                and all(n in MODALITIES for n in names)
                and len(set(names)) == len(names)
            ),
            f"isolated_modalities={names!r} is not allowed: use null or a non-empty list of distinct "
            f"names from {list(MODALITIES)}",
        )
        c.one_of("expert_bias", (True, False))
        c.one_of("normalize_top1", (True, False))
        c.positive("bias_update_rate")
        schedule = self.bias_update_rate_schedule
        ok = schedule is None or (
            isinstance(schedule, (list, tuple))
            and all(
                isinstance(e, (list, tuple))
                and len(e) == 2
                and isinstance(e[0], (int, float))
                and not isinstance(e[0], bool)
                and float(e[0]).is_integer()
                and e[0] >= 0
                and isinstance(e[1], (int, float))
                and not isinstance(e[1], bool)
                and e[1] > 0
                for e in schedule
            )
            and [e[0] for e in schedule] == sorted({e[0] for e in schedule})
        )
        c.require(
            ok,
            f"bias_update_rate_schedule={schedule!r} is not allowed: use null or [[step, rate], ...] "
            "with distinct ascending int steps >= 0 and rates > 0",
        )
        c.done()
        if schedule is not None:
            self.bias_update_rate_schedule = [[int(a), float(b)] for a, b in schedule]
        if self.isolated_modalities is not None:
            self.isolated_modalities = list(self.isolated_modalities)

    def bias_rate_at(self, step: int) -> float:
        """The bias update rate of step ``step`` (1-based)."""
        rate = self.bias_update_rate
        for start, value in self.bias_update_rate_schedule or ():
            if step >= start:
                rate = value
        return rate

    @property
    def partition_modalities(self) -> Tuple[str, ...]:
        """Modalities that own an expert partition (``modality_isolated``), in expert order."""
        return tuple(self.isolated_modalities) if self.isolated_modalities is not None else MODALITIES

    def problems_with_model(self, num_experts: int, top_k: int, score_function: str) -> List[str]:
        """Problems that need the MoE section (for the cross-section checks); empty when none."""
        problems: List[str] = []
        if self.expert_bias and score_function != "sigmoid":
            problems.append(
                f"routing.expert_bias=true needs moe.score_function='sigmoid' (got "
                f"{score_function!r}), as in Megatron-Core: set one or the other"
            )
        if self.mode == "modality_isolated":
            parts = len(self.partition_modalities)
            if num_experts % parts:
                problems.append(
                    f"routing.mode='modality_isolated' splits moe.num_experts={num_experts} into "
                    f"{parts} equal partitions ({', '.join(self.partition_modalities)}): make "
                    "num_experts divisible or list fewer routing.isolated_modalities"
                )
            elif num_experts // parts < top_k:
                problems.append(
                    f"routing.mode='modality_isolated': a partition of {num_experts // parts} experts "
                    f"is smaller than moe.top_k={top_k}"
                )
        return problems
