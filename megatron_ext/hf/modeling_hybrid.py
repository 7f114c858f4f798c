"""Hybrid full / sliding-window attention per KV head for HF transformers (remote code).

Exported next to ``config.json`` by ``python -m pretrain.hf export`` when no stock class represents
the model's allocation: a KV-head-wise hybrid (some KV heads of a layer use full attention, the
others a sliding window), or a layer-wise hybrid of a Qwen3-MoE. Load it with::

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

The model is the stock base model (``base_model_type``: Qwen3, Qwen3-MoE or dots1) whose attention
layers apply, per KV head, the mask of ``full_attention_heads[layer][kv_head]`` (1: causal, 0:
sliding window of ``hybrid_window`` keys: query i sees keys i-W+1..i, the training convention).
Every head keeps its whole KV cache here (the file's job is exact logits, not cache savings).
This file depends only on torch and transformers.
"""

import torch
from torch import nn
from transformers.models.dots1.configuration_dots1 import Dots1Config
from transformers.models.dots1.modeling_dots1 import Dots1ForCausalLM
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM, apply_rotary_pos_emb
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM


def _hybrid_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """The base attention's projections, QK-norms and RoPE; attention masked per KV head."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    k = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    cache = None
    for name in ("cache", "past_key_values", "past_key_value"):
        cache = cache if cache is not None else kwargs.get(name)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    groups = self.num_key_value_groups
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    q_len, kv_len = q.shape[2], k.shape[2]
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device).view(-1, 1)
    k_pos = torch.arange(kv_len, device=q.device).view(1, -1)
    full = torch.tensor(self.hybrid_full_heads, device=q.device).repeat_interleave(groups).view(-1, 1, 1)
    allowed = (k_pos <= q_pos) & (full | (k_pos > q_pos - self.hybrid_window))  # [heads, q, kv]
    scores = torch.matmul(q, k.transpose(2, 3)).float() * self.scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    if isinstance(attention_mask, torch.Tensor):  # padding (and the causal mask again)
        mask = attention_mask[..., -kv_len:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = nn.functional.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), probs


def _make_hybrid(model, config):
    """Give every attention layer of ``model`` its KV heads' flags and the per-head forward."""
    flags = config.full_attention_heads
    if len(flags) != config.num_hidden_layers:
        raise ValueError(f"full_attention_heads has {len(flags)} rows for {config.num_hidden_layers} layers")
    for layer in model.model.layers:
        attn = layer.self_attn
        row = tuple(bool(x) for x in flags[attn.layer_idx])
        if len(row) != config.num_key_value_heads:
            raise ValueError(
                f"full_attention_heads[{attn.layer_idx}] has {len(row)} flags for {config.num_key_value_heads} KV heads"
            )
        attn.hybrid_full_heads = row  # plain flags: models are built on the meta device first
        attn.hybrid_window = int(config.hybrid_window)
        attn.forward = _hybrid_forward.__get__(attn)


def _register_expert_layout():
    """The weights are in the Hub's per-expert layout; transformers versions that pack experts into
    one tensor convert it on load for the stock model types only, so register ours as theirs."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # versions without packed experts load the per-expert layout as it is
        return
    for ours, base in (("hybrid_qwen3_moe", "qwen3_moe"), ("hybrid_dots1", "dots1")):
        mapping = get_checkpoint_conversion_mapping(base)
        if mapping is not None and get_checkpoint_conversion_mapping(ours) is None:
            register_checkpoint_conversion_mapping(ours, mapping)


_register_expert_layout()


class HybridQwen3Config(Qwen3Config):
    model_type = "hybrid_qwen3"


class HybridQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = HybridQwen3Config

    def __init__(self, config):
        super().__init__(config)
        _make_hybrid(self, config)


class HybridQwen3MoeConfig(Qwen3MoeConfig):
    model_type = "hybrid_qwen3_moe"


class HybridQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = HybridQwen3MoeConfig

    def __init__(self, config):
        super().__init__(config)
        _make_hybrid(self, config)


class HybridDots1Config(Dots1Config):
    model_type = "hybrid_dots1"


class HybridDots1ForCausalLM(Dots1ForCausalLM):
    config_class = HybridDots1Config

    def __init__(self, config):
        super().__init__(config)
        _make_hybrid(self, config)
