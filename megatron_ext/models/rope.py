"""RoPE applied to a layer's query and key exactly as Megatron-Core's ``Attention.forward`` does,
for code that runs a layer's attention sublayer itself (SGT loop passes, cached decoding); and RoPE
by per-token position ids (:func:`rotate_by_position_ids`)."""

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


def rotate_by_position_ids(model) -> None:
    """Make ``model`` (a ``GPTModel`` with RoPE) rotate each token by its own position id, the
    ``position_ids`` argument of its forward (Megatron-LM's ``reset_position_ids``: positions that
    restart at each document), instead of by its index in the sequence.

    Megatron-Core's ``GPTModel`` (without packed THD sequences) computes the rotary table for
    ``0 .. s - 1`` and uses ``position_ids`` only for learned absolute embeddings. Here a forward
    pre-hook of the model keeps the forward's ``position_ids`` (``[b, s]``, this CP rank's chunks
    under context parallelism, as the forward step hands them over) until the forward ends, and a
    forward hook of its ``rotary_pos_emb`` returns ``[s, b, 1, d]`` frequencies, row ``(i, j)`` the
    table's row ``position_ids[j, i]``, which ``apply_rotary_pos_emb`` broadcasts over the heads. The
    table is computed once per forward, in the model's preprocessing, so activation recomputation and
    pipeline schedules reuse what that forward computed. Calls outside a forward (cached decoding)
    get the plain table."""
    rope = model.rotary_pos_emb
    state = {"positions": None}

    def keep(module, args, kwargs):
        state["positions"] = args[1] if len(args) > 1 else kwargs.get("position_ids")

    def forget(module, args, kwargs, output):
        state["positions"] = None

    def per_token(module, args, kwargs, output):
        positions = state["positions"]
        if positions is None:
            return None
        table = module.get_emb(args[0] if args else kwargs["max_seq_len"])[:, 0, 0]  # [s_full, d]
        return table[positions.t()].unsqueeze(2)  # [s, b, 1, d]

    model.register_forward_pre_hook(keep, with_kwargs=True)
    model.register_forward_hook(forget, with_kwargs=True, always_call=True)
    rope.register_forward_hook(per_token, with_kwargs=True)
