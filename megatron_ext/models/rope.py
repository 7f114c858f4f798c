"""RoPE applied to a layer's query and key exactly as Megatron-Core's ``Attention.forward`` does,
for code that runs a layer's attention sublayer itself (SGT loop passes, cached decoding)."""

from __future__ import annotations

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from megatron_ext.compat.layers import rope_mscale


def rotate_query_key(attn, layer_number: int, query, key, rotary_pos_emb):
    """``(query, key)`` of ``attn`` (a ``SelfAttention``; ``[s, b, heads, hn]``) after RoPE with the
    frequencies ``rotary_pos_emb`` (``[s, 1, 1, hn]``, or a (query, key) pair); unchanged without
    RoPE or for a layer listed in ``no_rope_freq``."""
    no_rope = attn.config.no_rope_freq[layer_number - 1] if attn.config.no_rope_freq else False
    if rotary_pos_emb is None or no_rope:
        return query, key
    q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
    mscale = rope_mscale(attn.config)
    cp_group = attn.pg_collection.cp
    query = apply_rotary_pos_emb(query, q_emb, config=attn.config, mscale=mscale, cp_group=cp_group)
    key = apply_rotary_pos_emb(key, k_emb, config=attn.config, mscale=mscale, cp_group=cp_group)
    return query, key
