"""Config -> Megatron ``TransformerConfig`` -> per-layer ``ModuleSpec``s -> ``GPTModel`` chunks."""

from __future__ import annotations

from functools import partial
from typing import List, Optional

import torch
import torch.nn.functional as F

from megatron_ext.config.schema import RunConfig
from megatron_ext.models.layer_spec import decoder_block_spec, gpt_layer_spec

VOCAB_PAD_MULTIPLE = 128
"""Megatron-LM's make-vocab-size-divisible-by default: the padded vocabulary is a multiple."""


def padded_vocab_size(vocab_size: int) -> int:
    """Vocabulary padded to a multiple of 128 (independent of TP, so checkpoints reshard)."""
    return -(-vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


def moe_layer_pattern(cfg: RunConfig) -> List[int]:
    """1 where layer i is an MoE layer, 0 where it keeps a dense MLP."""
    if not cfg.moe.enabled:
        return [0] * cfg.model.num_layers
    if cfg.moe.layer_pattern is not None:
        return list(cfg.moe.layer_pattern)
    return [0 if i < cfg.moe.first_k_dense else 1 for i in range(cfg.model.num_layers)]


def params_dtype(cfg: RunConfig, cuda: bool) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def transformer_config(cfg: RunConfig, *, cuda: bool, perform_initialization: bool = True):
    """Megatron ``TransformerConfig`` for this run (parallel sizes, precision, MoE, recompute)."""
    from megatron.core.transformer import TransformerConfig

    m, p, t, moe = cfg.model, cfg.parallel, cfg.train, cfg.moe
    dtype = params_dtype(cfg, cuda)
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=m.add_bias_linear,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        qk_layernorm=m.qk_layernorm,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor,
        sequence_parallel=p.sequence_parallel and p.tensor > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # CPU: build full master weights and split them (identical init at any TP size).
        use_cpu_initialization=not cuda,
        perform_initialization=perform_initialization,
        # Fusions below need Apex / TE / CUDA kernels.
        bias_activation_fusion=cuda and m.activation == "swiglu" and not m.add_bias_linear,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=cuda,
        # Megatron-LM's defaults for interleaved 1F1B: overlapped, un-batched p2p. The batched
        # form posts two sends to the same peer at PP=2 in an order the peer does not receive in.
        overlap_p2p_comm=p.virtual_pipeline is not None,
        batch_p2p_comm=p.virtual_pipeline is None,
    )
    if t.recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    elif t.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if moe.enabled:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
            moe_layer_freq=moe_layer_pattern(cfg),
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type=moe.load_balancing,
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_z_loss_coeff=moe.z_loss_coeff,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_router_score_function=moe.score_function,
            moe_router_dtype="fp32",
            moe_router_enable_expert_bias=cfg.routing.expert_bias,
            moe_router_bias_update_rate=cfg.routing.bias_update_rate,
        )
    return TransformerConfig(**kwargs)


def layer_specs(cfg: RunConfig) -> list:
    """One ModuleSpec per decoder layer of the whole model (layer i may differ from layer j).

    Hybrid attention swaps the core attention for :class:`HybridCoreAttention`, whose mode per
    layer (full / gated / static FA-SWA heads) the ConSA callback sets at run time; looping makes
    every layer a :class:`LoopedTransformerLayer`, whose loops the SGT callback grows.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_ext.models.attention import SDPACoreAttention

    core_attention = SDPACoreAttention if cfg.model.attention_backend == "sdpa" else DotProductAttention
    if cfg.hybrid_attention.enabled:
        from megatron_ext.consa.attention import HybridCoreAttention

        core_attention = partial(HybridCoreAttention, window=cfg.hybrid_attention.window)
    common = dict(qk_layernorm=cfg.model.qk_layernorm, core_attention=core_attention)
    dense = gpt_layer_spec(num_experts=None, **common)
    moe = None
    if cfg.moe.enabled:  # our router: elastic expert subsets / top-k, modality-isolated baseline
        from megatron_ext.moe.router import with_router

        moe = with_router(gpt_layer_spec(num_experts=cfg.moe.num_experts, **common), cfg.routing)
    specs = [moe if is_moe else dense for is_moe in moe_layer_pattern(cfg)]
    if cfg.looping.enabled:  # layers that can loop their attention (SGT); the callback grows loops
        from megatron_ext.sgt.looped_layer import looped_layer_spec

        specs = [looped_layer_spec(spec) for spec in specs]
    return specs


def build_model(cfg: RunConfig, *, cuda: bool, perform_initialization: bool = True) -> List[torch.nn.Module]:
    """GPTModel chunks of this rank: one, or one per virtual pipeline stage (interleaved 1F1B)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(cfg, cuda=cuda, perform_initialization=perform_initialization)
    specs = layer_specs(cfg)
    vp_stages: List[Optional[int]] = (
        list(range(cfg.parallel.virtual_pipeline)) if cfg.parallel.virtual_pipeline else [None]
    )
    chunks = []
    for vp_stage in vp_stages:
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=decoder_block_spec(config, specs, vp_stage),
                vocab_size=padded_vocab_size(cfg.model.vocab_size),
                max_sequence_length=cfg.model.max_position_embeddings or cfg.data.seq_length,
                position_embedding_type=cfg.model.position_embedding,
                rotary_base=cfg.model.rotary_base,
                share_embeddings_and_output_weights=cfg.model.tie_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
        )
    if cuda:  # as Megatron-LM's get_model: torch norms and buffers are built on the CPU
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    return chunks
