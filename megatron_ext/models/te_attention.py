"""Full causal and sliding-window attention through Transformer Engine, for the hybrid layers.

Megatron's ``TEDotProductAttention`` is built for one layer's whole set of heads and one mask; a
hybrid layer (:class:`~megatron_ext.consa.attention.HybridCoreAttention`) needs causal and
sliding-window attention, each over a subset of its heads (a KV-head-mixed layer runs its full and
its window heads as two calls). :class:`TEKernels` keeps one ``transformer_engine.pytorch.DotProductAttention``
per (query heads, KV heads, window), built on first use with this rank's head counts (``tp_size=1``:
the core attention already holds only its rank's heads) and TE's window convention
``window_size=(W - 1, 0)``: query ``i`` sees keys ``i - W + 1 .. i``, the project's (see
:mod:`~megatron_ext.models.kernels`).

The TE modules hold no parameters and are not submodules of the layer, so its state dict (and the
checkpoint) is the same on both backends.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

__all__ = ["TEKernels"]


class TEKernels:
    """``kernels(q, k, v, window=None)``: causal (``window`` None) or sliding-window attention of
    ``q [b, hq, s, d]`` over ``k, v [b, hkv, s, d]`` through Transformer Engine; returns ``[b, hq, s, d]``."""

    def __init__(self, head_dim: int, softmax_scale: float, layer_number: int):
        self.head_dim = head_dim
        self.softmax_scale = softmax_scale
        self.layer_number = layer_number
        self._modules: Dict[Tuple[int, int, Optional[int]], torch.nn.Module] = {}

    def module(self, q_heads: int, kv_heads: int, window: Optional[int]) -> torch.nn.Module:
        key = (q_heads, kv_heads, window)
        if key not in self._modules:
            import transformer_engine.pytorch as te

            self._modules[key] = te.DotProductAttention(
                num_attention_heads=q_heads,
                kv_channels=self.head_dim,
                num_gqa_groups=kv_heads,
                attention_dropout=0.0,
                qkv_format="sbhd",
                attn_mask_type="causal",
                window_size=None if window is None else (window - 1, 0),
                softmax_scale=self.softmax_scale,
                layer_number=self.layer_number,
                attention_type="self",
            )
        return self._modules[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
        b, hq, s, d = q.shape
        if window is not None and window >= k.shape[2]:
            window = None  # the window holds every key: causal attention
        sbhd = [x.permute(2, 0, 1, 3).contiguous() for x in (q, k, v)]
        out = self.module(hq, k.shape[1], window)(*sbhd)  # [s, b, hq * d]
        return out.view(s, b, hq, d).permute(1, 2, 0, 3)
