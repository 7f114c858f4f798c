"""Run config -> Megatron ``TransformerConfig`` -> per-layer ``ModuleSpec``s -> ``GPTModel`` chunks.

The model assembly of a run: it resolves the module backend once (:mod:`megatron_ext.run.backend`),
builds the core model from the building blocks of :mod:`megatron_ext.models`, and lets every enabled
capability (``cfg.capabilities``, in registry order) add its ``TransformerConfig`` keywords and rewrite
the per-layer specs with the resolved backend in hand.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, List, Optional

import torch
import torch.nn.functional as F

from megatron_ext.models.layer_spec import decoder_block_spec, gpt_layer_spec
from megatron_ext.models.vocab import padded_vocab_size
from megatron_ext.run.backend import fp8_config, resolve

if TYPE_CHECKING:
    from megatron_ext.run.config import RunConfig


def unsharded(cfg: RunConfig) -> RunConfig:
    """``cfg`` for one process: every parallel size 1 (checkpoints reshard on load)."""
    return dataclasses.replace(copy.deepcopy(cfg), parallel=type(cfg.parallel)())


def build_on_meta(cfg: RunConfig) -> torch.nn.Module:
    """The whole model of ``cfg`` (one unsharded chunk) on the meta device: names and shapes, no
    memory, no initialization. Needs Megatron's parallel state at TP = PP = EP = 1."""
    with torch.device("meta"):
        (model,) = build_model(unsharded(cfg), cuda=False, perform_initialization=False)
    return model


def params_dtype(cfg: RunConfig, cuda: bool) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    return torch.bfloat16 if precision in ("bf16", "fp8") else torch.float32


def transformer_config(cfg: RunConfig, *, cuda: bool, perform_initialization: bool = True):
    """Megatron ``TransformerConfig`` for this run (parallel sizes, precision, recompute, and what
    the enabled capabilities add)."""
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.models.rope import configure_rope_scaling

    m, p, t = cfg.model, cfg.parallel, cfg.train
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
        **fp8_config(cfg),
    )
    if t.recompute == "selective":
        kwargs.update(recompute_granularity="selective")
        if t.recompute_modules is not None:
            kwargs.update(recompute_modules=list(t.recompute_modules))
    elif t.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    for capability in cfg.capabilities:
        kwargs.update(capability.transformer_config(cfg))
    config = TransformerConfig(**kwargs)
    configure_rope_scaling(config, m.rope_scaling)  # YaRN's parameters are read from the config
    return config


def model_backend(cfg: RunConfig) -> str:
    """``model.backend`` of a resolved config (:func:`~megatron_ext.run.backend.resolve`); ``auto``
    not resolved yet counts as ``local`` (what a CPU build gets)."""
    return "te" if cfg.model.backend == "te" else "local"


def core_layer_spec(cfg: RunConfig):
    """The core spec of a decoder layer: pre-norm, dense MLP, and the core attention of full-attention
    layers: TE's attention under the ``te`` backend, else ``model.attention_backend``'s."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_ext.models.attention import SDPACoreAttention

    backend = model_backend(cfg)
    if backend == "te":
        core_attention = None  # the backend's: TEDotProductAttention
    else:
        core_attention = SDPACoreAttention if cfg.model.attention_backend == "sdpa" else DotProductAttention
    return gpt_layer_spec(qk_layernorm=cfg.model.qk_layernorm, core_attention=core_attention, backend=backend)


def layer_specs(cfg: RunConfig) -> list:
    """One ModuleSpec per decoder layer of the whole model (layer i may differ from layer j).

    The core spec (pre-norm layer, dense MLP, ``model.attention_backend``'s core attention) for
    every layer, then each enabled capability's rewrite, in registry order.
    """
    backend = model_backend(cfg)
    specs = [core_layer_spec(cfg)] * cfg.model.num_layers
    for capability in cfg.capabilities:
        specs = capability.layer_specs(cfg, specs, backend)
    return specs


def build_model(cfg: RunConfig, *, cuda: bool, perform_initialization: bool = True) -> List[torch.nn.Module]:
    """GPTModel chunks of this rank: one, or one per virtual pipeline stage (interleaved 1F1B)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_ext.compat import fix_recompute_without_te
    from megatron_ext.models.rope import rotary_model_kwargs, scale_rotary

    fix_recompute_without_te()  # selective recompute of norms without Transformer Engine (GPU images too)
    cfg = resolve(cfg, cuda)  # model.backend: local or te from here on
    backend = model_backend(cfg)
    config = transformer_config(cfg, cuda=cuda, perform_initialization=perform_initialization)
    specs = layer_specs(cfg)
    vp_stages: List[Optional[int]] = (
        list(range(cfg.parallel.virtual_pipeline)) if cfg.parallel.virtual_pipeline else [None]
    )
    core = core_layer_spec(cfg)
    chunks = []
    for vp_stage in vp_stages:
        extra = {}
        for capability in cfg.capabilities:
            extra.update(capability.gpt_model_kwargs(cfg, config, core, vp_stage, backend))
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=decoder_block_spec(config, specs, vp_stage, backend=backend),
                vocab_size=padded_vocab_size(cfg.model.vocab_size),
                max_sequence_length=cfg.model.max_position_embeddings or cfg.data.seq_length,
                **rotary_model_kwargs(cfg.model.position_embedding, cfg.model.rope_scaling),
                rotary_base=cfg.model.rotary_base,
                share_embeddings_and_output_weights=cfg.model.tie_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
                **extra,
            )
        )
    for chunk in chunks:
        scale_rotary(chunk, cfg.model.rope_scaling)
    if cfg.data.reset_position_ids and cfg.model.position_embedding == "rope":
        from megatron_ext.models.rope import rotate_by_position_ids

        for chunk in chunks:  # learned absolute embeddings take position_ids as they are
            rotate_by_position_ids(chunk)
    if cuda:  # as Megatron-LM's get_model: torch norms and buffers are built on the CPU
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    return chunks
