"""``TransformerLayer`` internals: its two sublayer forwards, RoPE's mscale, per-step layer skipping.

Written for megatron-core 0.16.1, where ``TransformerLayer.forward(*args, **kwargs)`` is
``_forward_attention(*args, **kwargs)`` (norm, self-attention, residual; returns
``(hidden_states, context)``) followed by ``_forward_mlp(hidden_states, inference_context,
padding_mask=...)``, and ``TransformerBlock`` calls each layer as ``layer(hidden_states=...,
attention_mask=..., context=..., ...)``. Each function checks, on first use, the internals it
relies on (:mod:`megatron_ext.compat.internals`).

* :func:`forward_attention` / :func:`forward_mlp`: a layer that runs something between its
  attention and its MLP (the SGT attention loop) needs the two halves of Megatron's forward
  separately; both are private methods.
* :func:`rope_mscale`: Megatron's attention applies RoPE with the YaRN concentration factor of
  the config (1.0 without YaRN), computed by a private helper; a loop pass that re-applies RoPE
  must use the same factor.
* :func:`set_yarn_config`: Megatron-Core's ``GPTModel`` builds its ``YarnRotaryEmbedding`` from
  ``yarn_*`` attributes of its config, and its attention reads the YaRN attention factor from them;
  only ``MLATransformerConfig`` declares them, so a dense model's ``TransformerConfig`` gets them as
  plain attributes.
* :func:`llama3_scale_rotary`: Llama 3.1's frequency scaling is ``RotaryEmbedding._apply_scaling``,
  whose ``GPTModel`` switch passes only ``factor`` (its other parameters fixed at Llama 3.1's
  values); the project applies it with all four.
* :func:`skip_layer` / :func:`unskip_layer` / :func:`is_skipped`: elastic depth turns a layer into
  a pass-through for one step by an instance-level ``forward``, which shadows the class's
  ``forward`` for that layer only, whatever subclass of ``TransformerLayer`` it is, without
  touching the class or rebuilding the block. The block and activation recomputation call
  ``layer(...)``, which dispatches to it. The pass-through reads its arguments in the layout of
  ``_forward_attention``, so that it accepts any call the real forward accepts.
* :func:`direct_linears`: in one process, a local ``ColumnParallelLinear`` / ``RowParallelLinear``
  computes ``matmul(input, weight.t())`` plus its bias unless skipped, through autograd functions
  and process-group lookups that exist for tensor parallelism and its backward. Cached decoding
  (one token a step) calls them by the hundred per token, and that machinery costs more than the
  products themselves; for its duration each such layer gets an instance-level ``forward`` (as
  :func:`skip_layer` does) that computes the same expression directly.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron_ext.compat.internals import Internal, require

_FORWARD_ATTENTION = Internal(
    "megatron.core.transformer.transformer_layer",
    "TransformerLayer._forward_attention",
    parameters=("hidden_states", "attention_mask", "context"),
    positional=True,
)
_FORWARD_MLP = Internal(
    "megatron.core.transformer.transformer_layer",
    "TransformerLayer._forward_mlp",
    parameters=("hidden_states", "inference_context", "padding_mask"),
    positional=True,
)
_LAYER_FORWARD = Internal(
    "megatron.core.transformer.transformer_layer",
    "TransformerLayer.forward",
    source_contains=("self._forward_attention(*args, **kwargs)", "return output, context"),
)
_BLOCK_CALLS_LAYER = Internal(
    "megatron.core.transformer.transformer_block",
    "TransformerBlock.forward",
    source_contains=("hidden_states=hidden_states", "context=context"),
)
_YARN_MSCALE = Internal(
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "_yarn_get_concentration_factor_from_config",
    parameters=("config",),
    positional=True,
)
_ATTENTION_MSCALE = Internal(
    "megatron.core.transformer.attention",
    "Attention.forward",
    source_contains=("mscale=_yarn_get_concentration_factor_from_config(self.config)",),
)
_YARN_CONFIG_ATTRIBUTES = (
    "yarn_rotary_scaling_factor",
    "yarn_original_max_position_embeddings",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_mscale",
    "yarn_mscale_all_dim",
    "yarn_correction_range_round_to_int",
)
_GPT_YARN = Internal(
    "megatron.core.models.gpt.gpt_model",
    "GPTModel.__init__",
    source_contains=("YarnRotaryEmbedding(",) + tuple(f'"{name}"' for name in _YARN_CONFIG_ATTRIBUTES),
)
_YARN_CONFIG_MSCALE = Internal(
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "_yarn_get_concentration_factor_from_config",
    source_contains=('hasattr(config, "yarn_rotary_scaling_factor")', 'getattr(config, "yarn_mscale", None)'),
)
_LLAMA3_SCALING = Internal(
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "RotaryEmbedding._apply_scaling",
    parameters=("freqs", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
)

_COLUMN_FORWARD = Internal(
    "megatron.core.tensor_parallel.layers",
    "ColumnParallelLinear.forward",
    parameters=("input_", "weight", "runtime_gather_output"),
    source_contains=(
        "bias = self.bias if not self.skip_bias_add else None",
        "output_bias = self.bias if self.skip_bias_add else None",
    ),
)
_ROW_FORWARD = Internal(
    "megatron.core.tensor_parallel.layers",
    "RowParallelLinear.forward",
    parameters=("input_",),
    source_contains=("output = (output_ + self.bias) if self.bias is not None else output_", "output_bias = self.bias"),
)
_LINEAR_PRODUCT = Internal(
    "megatron.core.tensor_parallel.layers",
    "LinearWithGradAccumulationAndAsyncCommunication.forward",
    source_contains=("output = torch.matmul(total_input, weight.t())", "output = output + bias"),
)
_FROZEN_LINEAR_PRODUCT = Internal(
    "megatron.core.tensor_parallel.layers",
    "LinearWithFrozenWeight.forward",
    source_contains=("output = torch.matmul(input, weight.t())", "output = output + bias"),
)

_SUBLAYERS = (_FORWARD_ATTENTION, _FORWARD_MLP, _LAYER_FORWARD)
_ROPE = (_YARN_MSCALE, _ATTENTION_MSCALE)
_ROPE_SCALING = (_GPT_YARN, _YARN_CONFIG_MSCALE, _YARN_MSCALE, _ATTENTION_MSCALE, _LLAMA3_SCALING)
_SKIP = (_FORWARD_ATTENTION, _LAYER_FORWARD, _BLOCK_CALLS_LAYER)
_DIRECT_LINEARS = (_COLUMN_FORWARD, _ROW_FORWARD, _LINEAR_PRODUCT, _FROZEN_LINEAR_PRODUCT)

INTERNALS = tuple(dict.fromkeys(_SUBLAYERS + _ROPE + _ROPE_SCALING + _SKIP + _DIRECT_LINEARS))
"""Every Megatron-Core internal this module relies on."""


def forward_attention(layer: torch.nn.Module, hidden_states: torch.Tensor, **kwargs):
    """The attention half of ``layer``'s forward: ``(hidden_states, context)`` after the residual.

    ``kwargs`` are those of ``TransformerLayer.forward`` (``attention_mask``, ``rotary_pos_emb``, ...).
    """
    require("megatron_ext.compat.layers.forward_attention", _SUBLAYERS)
    return layer._forward_attention(hidden_states, **kwargs)


def forward_mlp(
    layer: torch.nn.Module,
    hidden_states: torch.Tensor,
    inference_context=None,
    padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The MLP half of ``layer``'s forward (pre-MLP norm, MLP or MoE, residual)."""
    require("megatron_ext.compat.layers.forward_mlp", _SUBLAYERS)
    return layer._forward_mlp(hidden_states, inference_context, padding_mask=padding_mask)


def rope_mscale(config) -> float:
    """The ``mscale`` Megatron's attention hands ``apply_rotary_pos_emb`` for ``config``."""
    require("megatron_ext.compat.layers.rope_mscale", _ROPE)
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    return _yarn_get_concentration_factor_from_config(config)


def set_yarn_config(
    config,
    *,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float,
    beta_slow: float,
    mscale: float,
    mscale_all_dim: float,
    truncate: bool,
) -> None:
    """Give ``config`` (a ``TransformerConfig``) the ``yarn_*`` attributes that ``GPTModel``'s
    ``position_embedding_type="yarn"`` and the attention's RoPE factor (:func:`rope_mscale`) read.
    The attention factor is Megatron's ``get_mscale(factor, mscale) / get_mscale(factor,
    mscale_all_dim)`` with ``get_mscale(s, m) = 0.1 m ln(s) + 1``."""
    require("megatron_ext.compat.layers.set_yarn_config", _ROPE_SCALING)
    values = (factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim, truncate)
    for name, value in zip(_YARN_CONFIG_ATTRIBUTES, values):
        setattr(config, name, value)


def llama3_scale_rotary(
    rotary: torch.nn.Module,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> None:
    """Scale the frequencies of ``rotary`` (a freshly built, unscaled ``RotaryEmbedding``) the Llama
    3.1 way, with Megatron-Core's own ``RotaryEmbedding._apply_scaling``."""
    require("megatron_ext.compat.layers.llama3_scale_rotary", _ROPE_SCALING)
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq,
        factor=factor,
        low_freq_factor=low_freq_factor,
        high_freq_factor=high_freq_factor,
        original_max_position_embeddings=original_max_position_embeddings,
    )


def _pass_through(*args, **kwargs):
    """``TransformerLayer.forward`` of a skipped layer: ``(hidden_states, context)``, unchanged.

    The block calls ``layer(hidden_states=..., attention_mask=..., context=..., ...)``; the
    positional form follows ``TransformerLayer._forward_attention(hidden_states, attention_mask,
    context, ...)``.
    """
    hidden_states = args[0] if args else kwargs["hidden_states"]
    context = args[2] if len(args) > 2 else kwargs.get("context")
    return hidden_states, context


class _ZeroGradPassThrough:
    """A skipped layer's forward under overlapped gradient reduction: its input, plus a zero that
    depends on every parameter of the layer, so that each gets a zero gradient.

    Megatron DDP with ``overlap_grad_reduce`` starts a bucket's reduction once every parameter in
    it has reported its gradient (as often as in the first step); a layer that does not run reports
    none, and the step's ``finish_grad_sync`` would fail. With a zero gradient its parameters report
    as usual, their gradients stay exactly zero (``0 * x``), and the layer still computes nothing
    else: the cost is one read of its parameters per micro-batch.
    """

    def __init__(self, layer: torch.nn.Module):
        self.params = [p for p in layer.parameters() if p.requires_grad]

    def __call__(self, *args, **kwargs):
        hidden_states, context = _pass_through(*args, **kwargs)
        if self.params and torch.is_grad_enabled():
            touch = torch.stack([p.sum().to(hidden_states.dtype) for p in self.params]).sum()
            hidden_states = hidden_states + 0.0 * touch
        return hidden_states, context


def _is_pass_through(forward) -> bool:
    return forward is _pass_through or isinstance(forward, _ZeroGradPassThrough)


def is_skipped(layer: torch.nn.Module) -> bool:
    """Whether :func:`skip_layer` made ``layer`` a pass-through."""
    return _is_pass_through(vars(layer).get("forward"))


def skip_layer(layer: torch.nn.Module, zero_grads: bool = False) -> None:
    """Make the ``TransformerLayer`` ``layer`` return its input unchanged until :func:`unskip_layer`.

    ``zero_grads``: give each of its parameters an exact zero gradient (needed under Megatron DDP
    with ``overlap_grad_reduce``, see :class:`_ZeroGradPassThrough`); otherwise they get none.
    """
    require("megatron_ext.compat.layers.skip_layer", _SKIP)
    if "forward" in vars(layer) and not is_skipped(layer):
        raise RuntimeError(
            f"layer {layer.layer_number} already has an instance-level forward that "
            "skip_layer would replace: remove it before skipping the layer"
        )
    layer.forward = _ZeroGradPassThrough(layer) if zero_grads else _pass_through


def unskip_layer(layer: torch.nn.Module) -> None:
    """Undo :func:`skip_layer` (nothing to do for a layer that is not skipped)."""
    if is_skipped(layer):
        del layer.forward


class _DirectLinear:
    """The forward of one local ``ColumnParallelLinear`` / ``RowParallelLinear`` of a one-process
    group: ``(matmul(input, weight.t()) + bias, None)``, or ``(product, bias)`` where the layer
    returns its bias to be added later (``skip_bias_add``), as Megatron computes them."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, input_, weight=None, runtime_gather_output=None):
        m = self.module
        output = torch.matmul(input_, (m.weight if weight is None else weight).t())
        if m.skip_bias_add:
            return output, m.bias
        return (output if m.bias is None else output + m.bias), None


def direct_linear_layers(model: torch.nn.Module) -> list:
    """The layers of ``model`` that :func:`direct_linears` can compute: local Column/Row parallel
    linears (not Transformer Engine's, not subclasses) of a tensor-parallel group of one, outside
    expert communication, with no deferred weight-gradient buffer."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    def one_rank(group) -> bool:
        return group is None or not dist.is_initialized() or dist.get_world_size(group) == 1

    return [
        m
        for m in model.modules()
        if type(m) in (ColumnParallelLinear, RowParallelLinear)
        and one_rank(m.tp_group)
        and not m.explicit_expert_comm
        and not m.config.defer_embedding_wgrad_compute
        and m.config._cpu_offloading_context is None
        and "forward" not in vars(m)
    ]


@contextlib.contextmanager
def direct_linears(layers: list):
    """Within the block, each of ``layers`` (from :func:`direct_linear_layers`) computes its forward
    directly (see the module doc); outside it, Megatron's own forward again. Same values; no autograd
    graph for the weights (use under ``torch.no_grad``)."""
    require("megatron_ext.compat.layers.direct_linears", _DIRECT_LINEARS)
    for m in layers:
        m.forward = _DirectLinear(m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward
