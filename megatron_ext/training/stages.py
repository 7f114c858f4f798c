"""What a stage of a multi-stage run changes in the built model: its RoPE frequencies.

A stage may set ``model.rotary_base`` and ``model.rope_scaling`` (plain, linear or llama3; YaRN is
fixed for the run, :mod:`megatron_ext.run.schedule`). The model is not rebuilt (its weights and the
optimizer state over them carry on): the frequencies of each chunk's ``RotaryEmbedding`` are
recomputed here exactly as its constructor computes them (``1 / base^(2i / d)``, then Megatron-Core's
interpolation factor or Llama 3.1 scaling), so a model built with the stage's settings has the same
table bit for bit.
"""

from __future__ import annotations

from typing import List

import torch

from megatron_ext.models.rope import scale_rotary


def set_rotary(chunks: List[torch.nn.Module], model_cfg) -> None:
    """Give the RoPE of ``chunks`` (DDP-wrapped ``GPTModel`` chunks) the base and scaling of
    ``model_cfg`` (a run config's model section); nothing without RoPE."""
    for chunk in chunks:
        gpt = chunk.module
        rotary = getattr(gpt, "rotary_pos_emb", None)
        if rotary is None or gpt.position_embedding_type != "rope":
            continue
        dim = 2 * rotary.inv_freq.numel()  # kv_channels x rotary_percent, as the constructor's arange(0, dim, 2)
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=rotary.inv_freq.device) / dim
        rotary.inv_freq = 1.0 / (model_cfg.rotary_base**exponents)
        scaling = model_cfg.rope_scaling
        rotary.seq_len_interpolation_factor = float(scaling.factor) if scaling.type == "linear" else None
        scale_rotary(gpt, scaling)
        gpt.rotary_pos_emb_cache.clear()
        # Megatron-Core caches the tables per (module, length) on the class's forward.
        cache_clear = getattr(type(rotary).forward, "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
