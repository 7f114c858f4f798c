"""Megatron's top-k router with per-step restrictions: an expert subset, a top-k, modality isolation.

:class:`ElasticRouter` is Megatron-Core's :class:`TopKRouter` (same constructor, same scores,
aux-loss-free expert bias, aux losses) whose routing can be restricted for a step:

* active experts (elastic width): a bool mask ``[num_experts]``; every other expert gets a
  ``-inf`` logit before scoring, so it is never selected and gets zero gate weight;
* top-k (elastic sparsity): :func:`set_router_topk` changes ``router.topk`` of every router and
  ``config.moe_router_topk`` together, because the alltoall dispatcher sizes its buffers from the
  config (``num_out_tokens = tokens * config.moe_router_topk`` when dropless) and every MoE layer
  shares one ``TransformerConfig``.

With the sigmoid score function the expert bias enters the top-k selection as
``sigmoid(logit) + bias`` (Megatron's ``topk_routing_with_score_function``), where a ``-inf``
logit only gives a score of 0, not ``-inf``; a restricted step therefore also hands Megatron a
selection bias that is ``-inf`` on the excluded experts. Gate weights keep using the unbiased
scores, as in Megatron.

:class:`ModalityIsolatedRouter` is the ERNIE 4.5 baseline [paper]: the experts are split ([choice])
into equal contiguous partitions, one per modality, and a token may only select experts of its
modality's partition. It needs the modality ids of the micro-batch's tokens, which the forward
step hands to every router of a model chunk with :func:`set_modality_ids` before the forward. The agnostic
:class:`ElasticRouter` stores them too (for load statistics, :mod:`megatron_ext.moe.stats`) but its
routing never reads them.

Token order: hidden states are ``[s, b, h]``, so the router's ``[s*b]`` tokens are s-major; the
batch's ``[b, s]`` modality ids become ``ids.transpose(0, 1).reshape(-1)``. With sequence
parallelism the router holds only this tensor-parallel rank's slice of the sequence, rows
``[r*s/tp, (r+1)*s/tp)``, and takes the same rows of the ids. With context parallelism the forward
step must hand the ids of the tokens this rank's model consumes (the same slicing as the tokens).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Iterable, List, Optional, Sequence

import torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import get_pg_rank
from torch import Tensor

from megatron_ext.compat.moe import capacity_factor, set_topk, topk_selection_bias
from megatron_ext.data.vocab import MODALITIES
from megatron_ext.moe.config import RoutingConfig

__all__ = [
    "ElasticRouter",
    "ModalityIsolatedRouter",
    "elastic_routers",
    "router_builder",
    "set_modality_ids",
    "set_router_topk",
    "with_router",
]


class ElasticRouter(TopKRouter):
    """Megatron's :class:`TopKRouter` with a per-step active-expert subset (and top-k).

    Runtime state, set between steps (by :mod:`megatron_ext.moe.elastic`):

    * ``active_experts``: ``[num_experts]`` bool, or None for all experts (:meth:`set_active_experts`);
    * ``topk``: Megatron's attribute; change it with :func:`set_router_topk` only;
    * the micro-batch's modality ids (:meth:`set_modality_ids`), for statistics only.
    """

    def __init__(self, config, pg_collection=None, normalize_top1: bool = True):
        super().__init__(config=config, pg_collection=pg_collection)
        self.normalize_top1 = normalize_top1
        """Sigmoid scores: gate 1.0 at top-k 1 as well (``routing.normalize_top1``)."""
        self.default_topk = self.topk
        """The model's top-k (``config.moe_router_topk`` at construction)."""
        self.active_experts: Optional[Tensor] = None
        self._modality_ids: Optional[Tensor] = None  # [b, s] of the current micro-batch

    @property
    def layer_index(self) -> int:
        """Global (whole-model) index of this router's layer, 0-based."""
        if self.layer_number is None:
            raise RuntimeError("the router's layer number is not set: build it inside a TransformerLayer")
        return self.layer_number - 1

    # -- runtime state ---------------------------------------------------------------------------

    def set_active_experts(self, mask: Optional[Tensor]) -> None:
        """Restrict routing to ``mask`` (``[num_experts]`` bool); None: every expert."""
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            if mask.shape != (self.num_experts,):
                raise ValueError(
                    f"active-expert mask of shape {tuple(mask.shape)} does not fit the router's "
                    f"{self.num_experts} experts: use a bool tensor [num_experts]"
                )
            if int(mask.sum()) < self.topk:
                raise ValueError(
                    f"{int(mask.sum())} active experts are fewer than top-k={self.topk}: keep at least top-k experts"
                )
            mask = mask.to(self.weight.device)
        self.active_experts = mask

    def set_modality_ids(self, modality_ids: Optional[Tensor]) -> None:
        """The ``[b, s]`` modality ids of the next forward's tokens (see :func:`set_modality_ids`)."""
        self._modality_ids = modality_ids

    def token_modality_ids(self, seq_length: int, batch_size: int) -> Optional[Tensor]:
        """``[s*b]`` modality ids in this router's token order (s-major), or None when none were set.

        ``seq_length`` is the router's (local) sequence length: with sequence parallelism the
        rows of this tensor-parallel rank are taken.
        """
        ids = self._modality_ids
        if ids is None:
            return None
        ids_sb = ids.transpose(0, 1)  # [s, b]
        if self.config.sequence_parallel and ids_sb.size(0) != seq_length:
            rank = get_pg_rank(self.tp_group)
            ids_sb = ids_sb[rank * seq_length : (rank + 1) * seq_length]
        if tuple(ids_sb.shape) != (seq_length, batch_size):
            where = " (this rank's sequence-parallel slice)" if self.config.sequence_parallel else ""
            raise ValueError(
                f"modality ids of shape {tuple(ids.shape)} ([b, s]) do not match the router's tokens "
                f"[s={seq_length}, b={batch_size}]{where}: hand the ids of exactly the tokens this rank's "
                "model consumes (sliced like the tokens under context parallelism)"
            )
        return ids_sb.reshape(-1).to(self.weight.device)

    # -- routing ---------------------------------------------------------------------------------

    def allowed_experts(self, seq_length: int, batch_size: int) -> Optional[Tensor]:
        """Experts each token may select: ``[num_experts]`` or ``[s*b, num_experts]`` bool; None: all.

        The agnostic router depends on the step's active-expert subset only, never on the tokens'
        modality.
        """
        return self.active_experts

    def routing(self, logits: Tensor, padding_mask: Optional[Tensor] = None):
        """Megatron's top-k routing of ``logits`` [s, b, num_experts] restricted to the allowed experts.

        Returns Megatron's ``(probs, routing_map)``, both ``[s*b, num_experts]``. With sigmoid scores
        at top-k 1, Megatron's gate is the raw score; with ``normalize_top1`` it is divided by itself
        (1.0; 0 where capacity dropped the token), as at k > 1.
        """
        probs, routing_map = self._routing(logits, padding_mask)
        if self.normalize_top1 and self.topk == 1 and self.score_function == "sigmoid":
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        return probs, routing_map

    def _routing(self, logits: Tensor, padding_mask: Optional[Tensor]):
        if self.topk != self.config.moe_router_topk:
            raise RuntimeError(
                f"router.topk={self.topk} differs from config.moe_router_topk={self.config.moe_router_topk}, "
                "which sizes the token dispatcher's buffers: change both with set_router_topk()"
            )
        seq_length, batch_size = logits.shape[:2]
        allowed = self.allowed_experts(seq_length, batch_size)
        if allowed is None:
            return super().routing(logits, padding_mask=padding_mask)
        if self.routing_type == "sinkhorn":
            raise ValueError(
                "restricted routing (elastic width, modality isolation) is not supported with "
                "moe_router_load_balancing_type='sinkhorn': use top-k routing"
            )
        allowed_sbe = allowed.view(seq_length, batch_size, -1) if allowed.dim() == 2 else allowed
        logits = logits.masked_fill(~allowed_sbe, float("-inf"))  # [s, b, E]
        factor = self.config.moe_expert_capacity_factor
        if factor is not None and allowed.dim() == 1:
            # [choice] Capacity of a width-restricted step over its active experts: Megatron counts all
            # of them, so half the experts would take at most half the assignments.
            with capacity_factor(self, factor * self.num_experts / int(allowed.sum())):
                return self._restricted_routing(logits, allowed, padding_mask)
        return self._restricted_routing(logits, allowed, padding_mask)

    def _restricted_routing(self, logits: Tensor, allowed: Tensor, padding_mask: Optional[Tensor]):
        if self.score_function != "sigmoid":
            # softmax top-k selects among the logits (or their softmax): -inf is never selected.
            return super().routing(logits, padding_mask=padding_mask)
        bias = self.expert_bias if self.expert_bias is not None else logits.new_zeros(self.num_experts)
        selection_bias = torch.where(allowed, bias.float(), float("-inf"))  # [E] or [s*b, E]
        with topk_selection_bias(self, selection_bias):
            return super().routing(logits, padding_mask=padding_mask)


class ModalityIsolatedRouter(ElasticRouter):
    """ERNIE 4.5's modality-isolated routing, the baseline to modality-agnostic routing [paper].

    [choice] The experts form ``len(modalities)`` equal contiguous partitions, partition ``p`` for
    ``modalities[p]``; a token of modality ``m`` may select only the experts of ``m``'s partition
    (intersected with the step's active experts). Needs :func:`set_modality_ids` before every
    forward.

    Activation recomputation of the MoE layer is refused: a recomputed forward runs during the
    backward, when the router may already hold the next micro-batch's ids (1F1B).
    """

    def __init__(self, config, pg_collection=None, modalities: Sequence[str] = MODALITIES, normalize_top1: bool = True):
        super().__init__(config=config, pg_collection=pg_collection, normalize_top1=normalize_top1)
        modalities = tuple(modalities)
        unknown = [m for m in modalities if m not in MODALITIES]
        if not modalities or unknown or len(set(modalities)) != len(modalities):
            raise ValueError(
                f"isolated modalities {list(modalities)} are not allowed: use distinct names from {list(MODALITIES)}"
            )
        parts = len(modalities)
        if self.num_experts % parts or self.num_experts // parts < self.topk:
            raise ValueError(
                f"{self.num_experts} experts cannot form {parts} equal partitions of at least "
                f"top-k={self.topk} experts ({', '.join(modalities)})"
            )
        recomputes_moe = config.recompute_granularity == "full" or (
            config.recompute_granularity == "selective" and "moe" in (config.recompute_modules or [])
        )
        if recomputes_moe:
            raise ValueError(
                "modality-isolated routing does not support recomputing the MoE layer "
                f"(recompute_granularity={config.recompute_granularity!r}): a recomputed "
                "forward could see another micro-batch's modality ids"
            )
        self.modalities = modalities
        size = self.num_experts // parts
        partition_of_modality = torch.full((len(MODALITIES),), -1, dtype=torch.long)
        partition_experts = torch.zeros(parts, self.num_experts, dtype=torch.bool)
        for p, name in enumerate(modalities):
            partition_of_modality[MODALITIES.index(name)] = p
            partition_experts[p, p * size : (p + 1) * size] = True
        self.register_buffer("partition_of_modality", partition_of_modality, persistent=False)
        self.register_buffer("partition_experts", partition_experts, persistent=False)

    def check_modality_ids(self, modality_ids: Tensor) -> None:
        """Raise if some token's modality has no partition."""
        ids = modality_ids.reshape(-1).to(self.partition_of_modality.device)
        missing = torch.unique(ids[self.partition_of_modality[ids] < 0]).tolist()
        if missing:
            names = [MODALITIES[i] for i in missing]
            raise ValueError(
                f"tokens of modalities {names} have no expert partition (isolated modalities: "
                f"{list(self.modalities)}): add them to routing.isolated_modalities"
            )

    def allowed_experts(self, seq_length: int, batch_size: int) -> Tensor:
        ids = self.token_modality_ids(seq_length, batch_size)
        if ids is None:
            raise RuntimeError(
                "modality-isolated routing needs the tokens' modality ids: call "
                "set_modality_ids(model_chunk, batch['modality_ids']) in the forward step"
            )
        allowed = self.partition_experts[self.partition_of_modality[ids]]  # [s*b, E]
        if self.active_experts is not None:
            allowed = allowed & self.active_experts
        return allowed


# -- model-level helpers -------------------------------------------------------------------------


def elastic_routers(model_chunks: Iterable[torch.nn.Module]) -> List[ElasticRouter]:
    """Every :class:`ElasticRouter` of the (DDP-wrapped or bare) chunks, in module order."""
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, ElasticRouter)]


def set_router_topk(routers: Sequence[ElasticRouter], top_k: Optional[int]) -> None:
    """Route every token to ``top_k`` experts in every router (None: the model's default).

    Sets ``router.topk`` and the shared ``config.moe_router_topk`` that the token dispatcher
    sizes its buffers from; all routers must take the same k.
    """
    for router in routers:
        k = router.default_topk if top_k is None else top_k
        if not 1 <= k <= router.num_experts:
            raise ValueError(f"top-k={k} is not allowed: use 1 <= k <= {router.num_experts} experts")
        if router.active_experts is not None and k > int(router.active_experts.sum()):
            raise ValueError(f"top-k={k} exceeds the router's {int(router.active_experts.sum())} active experts")
        set_topk(router, k)


def set_modality_ids(model_chunk: torch.nn.Module, modality_ids: Tensor) -> None:
    """Hand the micro-batch's ``[b, s]`` input modality ids to every router of ``model_chunk``.

    Call it in the forward step before the chunk's forward (every pipeline stage). Routers of
    the agnostic mode keep them for load statistics only; modality-isolated routers route by them.
    """
    routers = elastic_routers([model_chunk])
    isolated = [r for r in routers if isinstance(r, ModalityIsolatedRouter)]
    if isolated:
        isolated[0].check_modality_ids(modality_ids)  # one check: the routers share the partitions
    for router in routers:
        router.set_modality_ids(modality_ids)


# -- specs ---------------------------------------------------------------------------------------


def router_builder(routing: RoutingConfig):
    """The router class (or partial) that ``MoESubmodules.router`` should build for ``routing``."""
    if routing.mode == "modality_isolated":
        return partial(
            ModalityIsolatedRouter, modalities=routing.partition_modalities, normalize_top1=routing.normalize_top1
        )
    return partial(ElasticRouter, normalize_top1=routing.normalize_top1)


def with_router(moe_spec: ModuleSpec, routing: RoutingConfig) -> ModuleSpec:
    """A copy of Megatron's MoE spec (``MoELayer`` with ``MoESubmodules``) whose router is the one
    of ``routing`` (:func:`router_builder`)."""
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    if not isinstance(getattr(moe_spec, "submodules", None), MoESubmodules):
        raise ValueError(f"with_router takes Megatron's MoE spec (MoELayer with MoESubmodules), got {moe_spec!r}")
    spec = copy.copy(moe_spec)
    spec.submodules = copy.copy(moe_spec.submodules)
    spec.submodules.router = router_builder(routing)
    return spec
