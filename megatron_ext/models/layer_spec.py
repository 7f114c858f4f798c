"""Transformer layer specs built on Megatron's ``ModuleSpec`` seams.

One function builds the spec of one decoder layer from what differs between layers (dense MLP or
MoE, which core attention, which backend); the model builder assembles a per-layer list of them.

* ``local``: Megatron-Core's local (non-TE) modules, with :class:`~megatron_ext.models.norm.Norm` so
  that sequence parallelism works without Apex / TE.
* ``te``: Transformer Engine's, as Megatron's ``get_gpt_layer_with_transformer_engine_spec``: the
  input norm fused into the QKV projection and the pre-MLP norm into a dense MLP's first linear
  (``TELayerNormColumnParallelLinear``), TE linears, ``TENorm`` for QK-norms and MoE layers, TE's
  attention, MoE experts as TE grouped GEMMs (``TEGroupedMLP``). Its checkpoints use the local
  names (``sharded_state_dict_keys_map``: the fused norms' weights are saved as ``input_layernorm.*``
  and ``pre_mlp_layernorm.*``), so a run can resume, evaluate or export on either backend; the
  modules themselves are the same parameters under other names.
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


BACKENDS = ("local", "te")

# A TE layer's checkpoint under the local layer's names: the norms fused into the next linear.
TE_TO_LOCAL_KEYS = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def spec_provider(backend: str = "local"):
    """Megatron's ``BackendSpecProvider`` of ``backend``: the local one with this project's norms, or TE's."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalNormSpecProvider()


def mlp_spec(num_experts: Optional[int] = None, moe_grouped_gemm: bool = False, backend: str = "local") -> ModuleSpec:
    """Megatron's MLP spec of ``backend``: dense (``num_experts`` None) or ``MoELayer`` (TE: experts as
    grouped GEMMs, whatever ``moe_grouped_gemm`` says)."""
    return get_mlp_module_spec_for_backend(
        backend=spec_provider(backend),
        num_experts=num_experts,
        moe_grouped_gemm=moe_grouped_gemm or (backend == "te" and num_experts is not None),
    )


def replace_mlp(spec: ModuleSpec, mlp: ModuleSpec, backend: str = "local") -> ModuleSpec:
    """A copy of layer ``spec`` with ``mlp`` as its MLP. A TE layer whose pre-MLP norm was fused into
    its dense MLP's first linear gets a norm module of its own (an MoE router reads normed input)."""
    out = replace_submodule(spec, "mlp", mlp)
    if backend == "te" and out.submodules.pre_mlp_layernorm is IdentityOp and is_moe(mlp):
        out = replace_submodule(out, "pre_mlp_layernorm", spec_provider("te").layer_norm())
    return out


def is_moe(mlp: ModuleSpec) -> bool:
    """Whether an MLP spec is an MoE layer."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer)


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
    core_attention: type | ModuleSpec | None = DotProductAttention,
    moe_grouped_gemm: bool = False,
    backend: str = "local",
) -> ModuleSpec:
    """Spec of one pre-norm decoder layer: norm -> self-attention -> norm -> MLP or MoE.

    ``core_attention`` None: the backend's own (TE: ``TEDotProductAttention``; local: Megatron's
    ``DotProductAttention``)."""
    if backend == "te":
        return _te_layer_spec(num_experts, qk_layernorm, core_attention)
    if core_attention is None:
        core_attention = DotProductAttention
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


def _te_layer_spec(num_experts: Optional[int], qk_layernorm: bool, core_attention) -> ModuleSpec:
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    provider = spec_provider("te")
    moe = num_experts is not None
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,  # fused into linear_qkv
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=TEDotProductAttention if core_attention is None else core_attention,
                    linear_proj=TERowParallelLinear,
                    # TENorm (Megatron swaps in Apex's norm for QK-norms only below TE 1.9)
                    q_layernorm=provider.layer_norm() if qk_layernorm else IdentityOp,
                    k_layernorm=provider.layer_norm() if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            # A dense MLP's norm is fused into its linear_fc1; an MoE layer's router reads normed input.
            pre_mlp_layernorm=provider.layer_norm() if moe else IdentityOp,
            mlp=mlp_spec(num_experts, backend="te"),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(TE_TO_LOCAL_KEYS),
        ),
    )


def block_norm(backend: str = "local") -> type:
    """The final norm of the decoder block."""
    return spec_provider(backend).layer_norm() if backend == "te" else Norm


def decoder_block_spec(config, layer_specs: list, vp_stage: Optional[int] = None, backend: str = "local"):
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
    return TransformerBlockSubmodules(layer_specs=layer_specs[offset : offset + count], layer_norm=block_norm(backend))


def map_specs(specs: list, rewrite) -> list:
    """``[rewrite(spec) for spec in specs]``, calling ``rewrite`` once per distinct spec object, so
    that layers which shared a spec still share its rewrite."""
    done = {}
    for spec in specs:
        if id(spec) not in done:
            done[id(spec)] = rewrite(spec)
    return [done[id(spec)] for spec in specs]
