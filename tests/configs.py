"""Run configs the tests share: the tiny model most CPU tests train, and how to vary it.

A test module states its run as the shared base plus what it changes, ``merge(TINY, {...})``, so the
differences are visible and no test module imports another's constants. ``merge`` merges section by
section: a section given as a dict updates that section's keys (a value inside it, nested dicts
included, replaces the old value whole); anything else (``name``, a section set to ``None``) replaces
the entry. Nothing is shared by reference: the result can be changed freely.

To state the default explicitly where a test depends on it, give the key its default value, e.g.
``{"model": {"num_query_groups": None}}`` for one KV head per query head.
"""

from __future__ import annotations

import copy

TINY = {
    "model": {
        "num_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 64,
        "vocab_size": 128,
    },
    "data": {"seq_length": 16},
    "train": {"micro_batch_size": 2, "global_batch_size": 4},
    "logging": {"tensorboard": False},
}
"""The tiny run: 2 layers of width 32, 4 query heads in 2 KV groups (both divide by TP = 2), a
128-token vocabulary, 16-token synthetic samples, 2 micro-batches of 2 per step on one rank, and
no TensorBoard files. Every other field is the config's default."""

SMALL = {
    "model": {
        "num_layers": 3,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 96,
        "vocab_size": 256,
        "qk_layernorm": True,
    },
}
"""A wider model with QK-norm (head dimension 16), for tests that measure attention, FLOPs or
generation rather than train: the model section only."""


EVERY_CAPABILITY = {
    "model": {
        "num_layers": 4,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 64,
        "vocab_size": 128,
        "qk_layernorm": True,
    },
    "data": {"kind": "synthetic", "seq_length": 32},
    "train": {
        "micro_batch_size": 1,
        "global_batch_size": 4,
        "steps": 12,
        "lr": 1.0e-2,
        "warmup_steps": 1,
        "eval_interval": 6,
        "eval_steps": 1,
    },
    "moe": {
        "enabled": True,
        "num_experts": 4,
        "top_k": 2,
        "expert_ffn_hidden_size": 32,
        "shared_expert_ffn_hidden_size": 32,
        "first_k_dense": 1,
    },
    "routing": {"expert_bias": True, "bias_update_rate": 1.0e-2},
    "elastic": {"enabled": True, "depth_full_prob": 0.5, "width_full_prob": 0.5, "topk_default_prob": 0.5},
    "hybrid_attention": {
        "enabled": True,
        "method": "consa",
        "granularity": "kv_head",
        "window": 8,
        "target": 0.5,
        "constraint": "per_layer",
    },
    "looping": {"enabled": True, "method": "sgt", "top_k_layers": 3, "max_loop_depth": 1, "num_keep_heads": 2},
}
"""Every capability on, at the smallest sizes that exercise them: 4 layers (the first dense, the
others MoE with 4 routed experts, top-2, a shared expert, expert bias, elastic depth / width /
top-k draws), ConSA KV-head gates (window 8, per-layer target 0.5), SGT loops on up to 3 layers,
32-token synthetic samples, one sample per micro-batch. The golden cases and the tests that
compare against them start from it."""


def merge(base: dict, *updates: dict) -> dict:
    """``base`` with ``updates`` applied in order, section by section (see the module docstring)."""
    out = copy.deepcopy(base)
    for update in updates:
        for section, values in copy.deepcopy(update).items():
            if isinstance(values, dict) and isinstance(out.get(section), dict):
                out[section].update(values)
            else:
                out[section] = values
    return out


def tiny(**sections: dict) -> dict:
    """``TINY`` with ``sections`` merged in: ``tiny(model={"num_layers": 4}, data={"seq_length": 32})``."""
    return merge(TINY, sections)
