"""Transformer layer specs built on Megatron's ``ModuleSpec`` seams.

One function builds the spec of one decoder layer from what differs between layers (dense MLP or
MoE, which core attention); the model builder assembles a per-layer list of them. The modules
are Megatron-Core's local (non-TE) ones, with :class:`~megatron_ext.models.norm.Norm` so that
sequence parallelism works without Apex / TE.
"""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ext.models.norm import Norm


class LocalNormSpecProvider(LocalSpecProvider):
    """Megatron's local backend with norms that support sequence parallelism."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return Norm


def mlp_spec(num_experts: Optional[int] = None, moe_grouped_gemm: bool = False) -> ModuleSpec:
    """Megatron's local MLP spec: dense (``num_experts`` None) or ``MoELayer``."""
    return get_mlp_module_spec_for_backend(
        backend=LocalNormSpecProvider(), num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm
    )


def replace_submodule(spec: ModuleSpec, path: str, value) -> ModuleSpec:
    """A copy of ``spec`` with the submodule at dotted ``path`` (e.g. ``self_attention.core_attention``)
    replaced by ``value``; the specs along the path are copied, everything else is shared."""
    head, _, rest = path.partition(".")
    out = copy.copy(spec)
    out.submodules = copy.copy(spec.submodules)
    setattr(out.submodules, head, replace_submodule(getattr(spec.submodules, head), rest, value) if rest else value)
    return out


def gpt_layer_spec(
    num_experts: Optional[int] = None,
    qk_layernorm: bool = False,
    core_attention: type | ModuleSpec = DotProductAttention,
    moe_grouped_gemm: bool = False,
) -> ModuleSpec:
    """Spec of one pre-norm decoder layer: norm -> self-attention -> norm -> MLP or MoE."""
    mlp = mlp_spec(num_experts, moe_grouped_gemm)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=Norm if qk_layernorm else IdentityOp,
                    k_layernorm=Norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_block_spec(config, layer_specs: list, vp_stage: Optional[int] = None):
    """Block spec for this pipeline stage: its slice of the per-layer ``layer_specs`` + final norm.

    ``layer_specs`` has one spec per decoder layer of the whole model (layer i may differ from
    layer j); the stage keeps the layers Megatron assigns to it, as ``get_gpt_decoder_block_spec``.
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if len(layer_specs) != config.num_layers:
        raise ValueError(f"got {len(layer_specs)} layer specs for num_layers={config.num_layers}")
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=layer_specs[offset : offset + count], layer_norm=Norm)


def map_specs(specs: list, rewrite) -> list:
    """``[rewrite(spec) for spec in specs]``, calling ``rewrite`` once per distinct spec object, so
    that layers which shared a spec still share its rewrite."""
    done = {}
    for spec in specs:
        if id(spec) not in done:
            done[id(spec)] = rewrite(spec)
    return [done[id(spec)] for spec in specs]
