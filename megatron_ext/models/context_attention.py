"""Causal attention over a context-parallel rank's two sequence chunks (layout and exchanges:
:mod:`megatron_ext.parallel.context`).

Query ``[b, hq, 2L, d]`` and key / value ``[b, hkv, 2L, d]`` hold this rank's chunks ``c0 < c1`` of
length ``L``. Each chunk's queries attend over the keys that end with the chunk itself, with the
causal mask aligned to its last key (the kernels' ``Tk >= Tq`` form, :mod:`megatron_ext.models.kernels`):

* full: the keys ``[0, (c + 1) L)`` of the all-gathered sequence;
* sliding window ``W``: the fetched halo of ``min(W - 1, cL)`` keys, then the chunk's own ``L``;
* sink + recent (LoZA's sparse units, ``sink > 0``): the all-gathered keys as for full attention, under
  the sink + window mask (dense cost, as without CP).

Either way a query sees exactly the keys it sees without CP, so the outputs and gradients equal the
single-rank attention's up to the order of floating-point sums. Under document masking ``doc_start``
holds the whole sequence's document starts (:mod:`~megatron_ext.models.documents`), and each chunk's
queries get theirs in the coordinates of the keys they attend over.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ext.models.documents import key_starts
from megatron_ext.models.kernels import causal_attention, sink_window_attention, sliding_window_attention
from megatron_ext.parallel.context import ContextParallel

__all__ = ["context_parallel_attention"]


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp: ContextParallel,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    sink: int = 0,
    doc_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal (``window`` None), sliding-window or sink + recent (``sink > 0``) attention of this
    rank's two chunks; ``[b, hq, 2L, d]``. ``doc_start [b, T]``: the whole sequence's document starts
    (document masking), or None."""
    length = cp.chunk_length(q.shape[2])
    chunks = [slice(0, length), slice(length, 2 * length)]
    outputs = []

    def starts(chunk: int, key_first: int) -> Optional[torch.Tensor]:
        return None if doc_start is None else key_starts(doc_start, chunk * length, length, key_first)

    if window is None or sink:
        k_all, v_all = cp.gather_sequence(k, 2), cp.gather_sequence(v, 2)  # [b, hkv, T, d]
        for chunk, local in zip(cp.chunks, chunks):
            end = (chunk + 1) * length
            keys, values = k_all[:, :, :end], v_all[:, :, :end]
            outputs.append(
                causal_attention(q[:, :, local], keys, values, scale, starts(chunk, 0))
                if window is None
                else sink_window_attention(q[:, :, local], keys, values, window, sink, scale, starts(chunk, 0))
            )
    else:
        k_halos, v_halos = cp.fetch_halo(k, 2, window), cp.fetch_halo(v, 2, window)
        for chunk, local, k_halo, v_halo in zip(cp.chunks, chunks, k_halos, v_halos):
            k_keys = torch.cat([k_halo, k[:, :, local]], dim=2)  # [b, hkv, halo + L, d]
            v_keys = torch.cat([v_halo, v[:, :, local]], dim=2)
            key_start = starts(chunk, chunk * length - k_halo.shape[2])
            outputs.append(sliding_window_attention(q[:, :, local], k_keys, v_keys, window, scale, key_start))
    return torch.cat(outputs, dim=2)
