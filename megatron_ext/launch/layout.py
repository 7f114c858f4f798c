"""Global rank -> parallel coordinates, and the groups of ranks that share them, in Megatron's order.

Megatron-Core (``parallel_state.initialize_model_parallel`` with its default order
``"tp-cp-ep-dp-pp"``) numbers the ranks of a job twice, with two mixed-radix decompositions of the
same global rank (``RankGenerator``; the first named dimension varies fastest):

    dense layers:   rank = tp  + TP  * (cp + CP * (dp  + DP  * pp))      EP does not appear (size 1)
    expert layers:  rank = etp + ETP * (ep + EP * (edp + EDP * pp))      CP does not appear (size 1)

with DP = world / (TP * PP * CP) and EDP = world / (ETP * EP * PP); both decompositions share the
pipeline digit, so a rank is on the same stage for dense and expert layers. A group of one kind
(TP, DP, EP, ...) holds the ranks whose digits agree everywhere except in that kind's digits
(``generate_masked_orthogonal_rank_groups``); groups are listed in order of their lowest rank and
each group's ranks ascend, as in Megatron. Ranks are placed on nodes in blocks of
``gpus_per_node`` consecutive ranks, as torchrun does (node = rank // gpus_per_node).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

from megatron_ext.parallel.sizes import layout_problems

if TYPE_CHECKING:
    from megatron_ext.run import RunConfig


DENSE_ORDER = ("tp", "cp", "dp", "pp")
"""Digits of the dense decomposition, fastest first (Megatron's tp-cp-ep-dp-pp with EP = 1)."""
EXPERT_ORDER = ("etp", "ep", "edp", "pp")
"""Digits of the expert decomposition, fastest first (tp-cp-ep-dp-pp with CP = 1)."""

GROUP_KINDS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "tp": ("dense", ("tp",)),
    "cp": ("dense", ("cp",)),
    "dp": ("dense", ("dp",)),
    "pp": ("dense", ("pp",)),
    "dp-cp": ("dense", ("cp", "dp")),
    "tp-pp": ("dense", ("tp", "pp")),
    "ep": ("expert", ("ep",)),
    "etp": ("expert", ("etp",)),
    "edp": ("expert", ("edp",)),
    "etp-ep": ("expert", ("etp", "ep")),
}
"""Group kinds: which decomposition they come from and which of its digits vary inside a group.
``dp-cp`` is the group gradients are reduced over, ``tp-pp`` the model-parallel group,
``etp-ep`` the expert-model-parallel group of Megatron."""

INTRA_NODE_KINDS = ("tp", "ep", "etp")
"""Groups that communicate on every layer (TP all-reduce / all-gather, EP all-to-all): they belong
on one node's NVLink; across nodes they run at network speed."""


@dataclass(frozen=True)
class RankCoordinates:
    """Where one global rank sits in every parallel dimension."""

    rank: int
    node: int
    tp: int
    cp: int
    dp: int
    pp: int
    ep: int
    etp: int
    edp: int


def _digits(rank: int, sizes: Sequence[int]) -> List[int]:
    """Mixed-radix digits of ``rank``, the first size varying fastest."""
    digits = []
    for size in sizes:
        digits.append(rank % size)
        rank //= size
    return digits


@dataclass(frozen=True)
class Layout:
    """Parallel sizes of a job of ``world`` ranks on nodes of ``gpus_per_node`` ranks each."""

    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    world: int
    gpus_per_node: int

    def __post_init__(self):
        _, problems = layout_problems(
            self.world, tensor=self.tp, pipeline=self.pp, context=self.cp, expert=self.ep, expert_tensor=self.etp
        )
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_config(cls, cfg: RunConfig, nodes: int, gpus_per_node: int) -> "Layout":
        p = cfg.parallel
        return cls(
            tp=p.tensor,
            pp=p.pipeline,
            cp=p.context,
            ep=p.expert,
            etp=p.expert_tensor or p.tensor,
            world=nodes * gpus_per_node,
            gpus_per_node=gpus_per_node,
        )

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp * self.pp)

    @property
    def edp(self) -> int:
        return self.world // (self.etp * self.ep * self.pp)

    @property
    def nodes(self) -> int:
        return -(-self.world // self.gpus_per_node)

    def _sizes(self, decomposition: str) -> Dict[str, int]:
        if decomposition == "dense":
            return {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp}
        return {"etp": self.etp, "ep": self.ep, "edp": self.edp, "pp": self.pp}

    def coordinates(self) -> List[RankCoordinates]:
        """Every global rank's coordinates, rank 0 first."""
        dense, expert = self._sizes("dense"), self._sizes("expert")
        result = []
        for rank in range(self.world):
            tp, cp, dp, pp = _digits(rank, [dense[k] for k in DENSE_ORDER])
            etp, ep, edp, expert_pp = _digits(rank, [expert[k] for k in EXPERT_ORDER])
            assert expert_pp == pp, "both decompositions end in the pipeline digit"
            result.append(
                RankCoordinates(
                    rank=rank, node=rank // self.gpus_per_node, tp=tp, cp=cp, dp=dp, pp=pp, ep=ep, etp=etp, edp=edp
                )
            )
        return result

    def groups(self, kind: str) -> List[List[int]]:
        """The rank groups of ``kind`` (a key of GROUP_KINDS), as Megatron builds them."""
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r}: use one of {', '.join(GROUP_KINDS)}")
        decomposition, members = GROUP_KINDS[kind]
        order = DENSE_ORDER if decomposition == "dense" else EXPERT_ORDER
        sizes = self._sizes(decomposition)
        fixed = [i for i, name in enumerate(order) if name not in members]
        by_key: Dict[Tuple[int, ...], List[int]] = {}
        for rank in range(self.world):
            digits = _digits(rank, [sizes[name] for name in order])
            by_key.setdefault(tuple(digits[i] for i in fixed), []).append(rank)
        return list(by_key.values())  # dicts keep insertion order: groups by lowest rank

    def cross_node_groups(self, kind: str) -> List[List[int]]:
        """Groups of ``kind`` whose ranks are on more than one node."""
        return [g for g in self.groups(kind) if len({r // self.gpus_per_node for r in g}) > 1]

    def node_warnings(self, kinds: Sequence[str] = INTRA_NODE_KINDS) -> List[str]:
        """One sentence per group kind of ``kinds`` (by default all that should stay inside a node)
        whose groups cross nodes."""
        warnings = []
        for kind in kinds:
            crossing = self.cross_node_groups(kind)
            if not crossing:
                continue
            example = crossing[0]
            nodes = sorted({r // self.gpus_per_node for r in example})
            warnings.append(
                f"{kind.upper()} groups cross node boundaries ({len(crossing)} of {len(self.groups(kind))}, "
                f"e.g. ranks {example} on nodes {nodes}): {kind.upper()}={len(example)} communicates every "
                f"layer and belongs inside one node of {self.gpus_per_node} GPUs; lower it or use "
                "more GPUs per node"
            )
        return warnings
