"""``TopKRouter`` internals: changing top-k at run time, and a selection-only expert bias.

Written for megatron-core 0.16.1. Megatron fixes a router's top-k at construction; nothing in its
API changes it afterwards, nor lets a caller bias the top-k selection for one call. Elastic
sparsity and elastic width (:mod:`megatron_ext.moe`) need both, and get them from what 0.16.1's
code reads:

* top-k: ``TopKRouter.routing`` selects ``self.topk`` experts (set from ``config.moe_router_topk``
  in ``__init__``), while the alltoall dispatcher sizes its dropless output buffer from the
  config (``num_out_tokens = tokens * config.moe_router_topk`` in ``preprocess``), which every
  MoE layer shares: :func:`set_topk` writes both.
* selection bias: ``TopKRouter.routing`` hands ``self.expert_bias`` to
  ``topk_routing_with_score_function(..., expert_bias=...)``, which adds it to the scores for the
  top-k selection only (gate weights use the unbiased scores); nothing else in ``routing`` reads
  it. :func:`topk_selection_bias` swaps it for one call.
* capacity: ``TopKRouter.routing`` drops tokens beyond ``get_capacity(tokens * topk, num_experts,
  config.moe_expert_capacity_factor)`` per expert, counting every expert, also those a restricted
  step excludes: :func:`capacity_factor` sets the factor for one call (the config is shared).
* auxiliary losses: the routers add every micro-batch's load-balancing and z-loss values (without
  their coefficients) per layer to ``moe_utils``' layer-wise logging tracker, which Megatron-LM's
  training loop reads and zeroes in ``track_moe_metrics`` (its reduction uses ``ReduceOp.AVG``,
  which gloo lacks): :func:`take_aux_losses` reads and zeroes it.
* MTP losses: ``GPTModel`` adds each MTP layer's loss (mean over the micro-batch's tokens) to
  ``MTPLossLoggingHelper.tracker["values"]``, read and zeroed by :func:`take_mtp_losses`.
* token counts: with the expert bias on, ``TopKRouter._apply_expert_bias`` adds each routed
  forward's tokens per expert to ``self.local_tokens_per_expert`` (created in ``__init__``), which
  ``finalize_model_grads`` reduces for the bias update and then zeroes. A grad-enabled forward
  outside a training step would leak into the next update: :func:`reset_token_counts` zeroes them.

Each function checks, on first use, the internals it relies on (:mod:`megatron_ext.compat.internals`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_ext.compat.internals import Internal, require

_ROUTER = "megatron.core.transformer.moe.router"

_TOPK = (
    Internal(_ROUTER, "TopKRouter.__init__", source_contains=("self.topk = self.config.moe_router_topk",)),
    Internal(_ROUTER, "TopKRouter.routing", source_contains=("self.topk",)),
    Internal(
        "megatron.core.transformer.moe.token_dispatcher",
        "MoEAlltoAllTokenDispatcher.preprocess",
        source_contains=("self.config.moe_router_topk",),
    ),
    Internal("megatron.core.transformer.transformer_config", "TransformerConfig.moe_router_topk"),
)
_SELECTION_BIAS = (
    Internal(
        _ROUTER,
        "TopKRouter.routing",
        parameters=("logits", "padding_mask"),
        source_contains=("expert_bias=self.expert_bias",),
    ),
    Internal(
        "megatron.core.transformer.moe.moe_utils",
        "topk_routing_with_score_function",
        parameters=("logits", "topk", "score_function", "expert_bias"),
    ),
)

_CAPACITY = (
    Internal(
        _ROUTER, "TopKRouter.routing", source_contains=("capacity_factor=self.config.moe_expert_capacity_factor",)
    ),
    Internal(
        "megatron.core.transformer.moe.moe_utils",
        "apply_router_token_dropping",
        parameters=("routing_probs", "routing_map", "router_topk", "capacity_factor"),
        source_contains=("num_experts=num_experts",),
    ),
)
_TOKEN_COUNTS = (
    Internal(_ROUTER, "TopKRouter.__init__", source_contains=("self.local_tokens_per_expert",)),
    Internal(
        _ROUTER,
        "TopKRouter._apply_expert_bias",
        source_contains=("self.local_tokens_per_expert += routing_map.sum(dim=0)",),
    ),
)

_AUX_LOSSES = (
    Internal("megatron.core.transformer.moe.moe_utils", "get_moe_layer_wise_logging_tracker"),
    Internal(
        "megatron.core.transformer.moe.moe_utils",
        "save_to_aux_losses_tracker",
        source_contains=('tracker[name]["values"][layer_number - 1] += loss.detach()',),
    ),
)

_MTP_LOSSES = (
    Internal(
        "megatron.core.transformer.multi_token_prediction",
        "MTPLossLoggingHelper.save_loss_to_tracker",
        source_contains=('tracker["values"][layer_number] += loss.detach()',),
    ),
)

INTERNALS = tuple(dict.fromkeys(_TOPK + _SELECTION_BIAS + _CAPACITY + _TOKEN_COUNTS + _AUX_LOSSES + _MTP_LOSSES))
"""Every Megatron-Core internal this module relies on."""


def set_topk(router: torch.nn.Module, k: int) -> None:
    """Make ``router`` (a ``TopKRouter``) and the token dispatcher route every token to ``k`` experts.

    Writes ``router.topk`` and ``router.config.moe_router_topk``; the config is shared by all MoE
    layers of the model, so every router must be set to the same ``k`` before the next forward.
    """
    require("megatron_ext.compat.moe.set_topk", _TOPK)
    router.topk = k
    router.config.moe_router_topk = k


@contextmanager
def topk_selection_bias(router: torch.nn.Module, bias: torch.Tensor):
    """Within the block, ``router.routing`` selects top-k by ``score + bias`` (``[num_experts]`` or
    ``[tokens, num_experts]``); the learned ``expert_bias`` buffer is restored untouched after."""
    require("megatron_ext.compat.moe.topk_selection_bias", _SELECTION_BIAS)
    learned = router.expert_bias
    router.expert_bias = bias
    try:
        yield
    finally:
        router.expert_bias = learned


def reset_token_counts(router: torch.nn.Module) -> None:
    """Zero ``router``'s per-expert token counts of the expert-bias update (no-op without the bias)."""
    require("megatron_ext.compat.moe.reset_token_counts", _TOKEN_COUNTS)
    if router.local_tokens_per_expert is not None:
        router.local_tokens_per_expert.zero_()


@contextmanager
def capacity_factor(router: torch.nn.Module, factor: float):
    """Within the block, ``router.routing`` drops tokens at ``factor`` instead of the config's
    ``moe_expert_capacity_factor`` (restored after, also on error)."""
    require("megatron_ext.compat.moe.capacity_factor", _CAPACITY)
    config = router.config
    configured = config.moe_expert_capacity_factor
    config.moe_expert_capacity_factor = factor
    try:
        yield
    finally:
        config.moe_expert_capacity_factor = configured


def take_aux_losses() -> dict:
    """``{name: [layers] values}`` the routers logged since the last call (this rank's sums over
    its micro-batches: load-balancing losses and ``z_loss``, without their coefficients); the
    tracker is zeroed."""
    require("megatron_ext.compat.moe.take_aux_losses", _AUX_LOSSES)
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    out = {}
    for name, entry in get_moe_layer_wise_logging_tracker().items():
        out[name] = entry["values"].detach().clone()
        entry["values"].zero_()
    return out


def take_mtp_losses(num_layers: int) -> torch.Tensor:
    """``[num_layers]`` MTP losses the model logged since the last call (this rank's sums over its
    micro-batches; zeros where it computed none, e.g. a stage without the MTP block); zeroed."""
    require("megatron_ext.compat.moe.take_mtp_losses", _MTP_LOSSES)
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    values = MTPLossLoggingHelper.tracker.get("values")
    if values is None:
        return torch.zeros(num_layers)
    out = values.detach().clone().cpu()
    values.zero_()
    return out
