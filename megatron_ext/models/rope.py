"""RoPE applied to a layer's query and key exactly as Megatron-Core's ``Attention.forward`` does,
for code that runs a layer's attention sublayer itself (SGT loop passes, cached decoding); RoPE by
per-token position ids (:func:`rotate_by_position_ids`); and RoPE scaling for context extension
(HF's ``rope_scaling`` types) through Megatron-Core's rotary classes:

* ``linear`` (position interpolation, Chen et al. 2023: position ``m`` rotated as ``m / factor``):
  ``RotaryEmbedding``'s ``seq_len_interpolation_factor``.
* ``yarn`` (Peng et al. 2023: NTK-by-parts frequencies, eq. 18-20, and cos / sin scaled by the
  attention factor ``sqrt(1/t) = 0.1 ln(s) + 1``, eq. 21): ``GPTModel``'s ``YarnRotaryEmbedding``
  (``position_embedding_type="yarn"``); Megatron's attention applies the factor from the config.
* ``llama3`` (Llama 3.1: wavelengths above ``L / low_freq_factor`` divided by ``factor``, below
  ``L / high_freq_factor`` kept, smoothly interpolated between): ``RotaryEmbedding._apply_scaling``.

A scaling is described by any object with the fields of HF's ``rope_scaling`` (the run config's
``model.rope_scaling``); each function here reads those fields and nothing else of the run.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from megatron_ext.compat.layers import llama3_scale_rotary, rope_mscale, set_yarn_config


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


def _yarn_mscale(scale: float, m: float) -> float:
    """YaRN's ``0.1 m ln(s) + 1`` (1 for ``s <= 1``), as HF and Megatron-Core both define it."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def yarn_attention_factor(scaling) -> float:
    """The factor HF's YaRN scales cos and sin by: ``attention_factor`` if given; else
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set and non-zero
    (DeepSeek's form); else ``0.1 ln(factor) + 1`` (the paper's eq. 21)."""
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.mscale and scaling.mscale_all_dim:
        return float(
            _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        )
    return _yarn_mscale(scaling.factor, 1.0)


def _megatron_yarn_mscales(scaling) -> tuple[float, float]:
    """``(mscale, mscale_all_dim)`` for which Megatron-Core's ratio ``mscale(factor, mscale) /
    mscale(factor, mscale_all_dim)`` is :func:`yarn_attention_factor`. HF uses the pair only when both
    are non-zero and no ``attention_factor`` is given; otherwise ``mscale_all_dim = 0`` makes the
    denominator exactly 1, and ``mscale`` solves ``0.1 mscale ln(factor) + 1 = attention_factor``."""
    if scaling.attention_factor is None:  # HF's own forms, which Megatron computes the same way
        both = scaling.mscale and scaling.mscale_all_dim
        return (float(scaling.mscale), float(scaling.mscale_all_dim)) if both else (1.0, 0.0)
    if scaling.factor <= 1:  # Megatron applies no factor at factor 1; the config refuses another one there
        return 1.0, 0.0
    return (yarn_attention_factor(scaling) - 1.0) / (0.1 * math.log(scaling.factor)), 0.0


def configure_rope_scaling(config, scaling) -> None:
    """Prepare ``config`` (a ``TransformerConfig``) for ``scaling`` (type None: nothing): YaRN's
    parameters, read by ``GPTModel``'s ``YarnRotaryEmbedding`` and by the attention's RoPE factor."""
    if scaling.type != "yarn":
        return
    mscale, mscale_all_dim = _megatron_yarn_mscales(scaling)
    set_yarn_config(
        config,
        factor=float(scaling.factor),
        original_max_position_embeddings=scaling.original_max_position_embeddings,
        beta_fast=float(scaling.beta_fast or 32),
        beta_slow=float(scaling.beta_slow or 1),
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
        truncate=True if scaling.truncate is None else scaling.truncate,
    )


def rotary_model_kwargs(position_embedding: str, scaling) -> Dict[str, Any]:
    """``GPTModel`` keywords for ``position_embedding`` with ``scaling`` (type None: plain RoPE)."""
    if scaling.type is None:
        return {"position_embedding_type": position_embedding}
    if scaling.type == "yarn":
        return {"position_embedding_type": "yarn"}
    if scaling.type == "linear":
        return {"position_embedding_type": "rope", "seq_len_interpolation_factor": float(scaling.factor)}
    return {"position_embedding_type": "rope"}  # llama3: scale_rotary after construction


def scale_rotary(model, scaling) -> None:
    """What ``GPTModel``'s keywords cannot express: Llama 3.1's scaling with its four parameters, on
    the frequencies of ``model``'s (a freshly built ``GPTModel``'s) ``RotaryEmbedding``."""
    if scaling.type != "llama3" or getattr(model, "rotary_pos_emb", None) is None:
        return
    llama3_scale_rotary(
        model.rotary_pos_emb,
        factor=float(scaling.factor),
        low_freq_factor=float(scaling.low_freq_factor),
        high_freq_factor=float(scaling.high_freq_factor),
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )


def rotary_table(model, length: int) -> Optional[Any]:
    """RoPE frequencies of positions ``0 .. length - 1`` (``[length, 1, 1, hn]``) of ``model`` (a
    ``GPTModel``), as its forward computes them (scaled, YaRN's included), or None without RoPE. The
    YaRN attention factor is not in the table: :func:`rotate_query_key` applies it."""
    if getattr(model, "rotary_pos_emb", None) is None or model.position_embedding_type not in ("rope", "yarn"):
        return None
    table = model.rotary_pos_emb(length)
    return table[0] if model.position_embedding_type == "yarn" else table  # yarn: (frequencies, mscale)


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
    get the plain table. A scaled RoPE (``model.rope_scaling``) is indexed the same way: its table
    holds the scaled frequencies (YaRN's ``(frequencies, mscale)`` pair keeps its mscale)."""
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
        table = module.get_emb(args[0] if args else kwargs["max_seq_len"])
        if isinstance(output, tuple):  # YarnRotaryEmbedding: (frequencies, mscale)
            return table[0][:, 0, 0][positions.t()].unsqueeze(2), output[1]
        return table[:, 0, 0][positions.t()].unsqueeze(2)  # [s_full, d] -> [s, b, 1, d]

    model.register_forward_pre_hook(keep, with_kwargs=True)
    model.register_forward_hook(forget, with_kwargs=True, always_call=True)
    rope.register_forward_hook(per_token, with_kwargs=True)
