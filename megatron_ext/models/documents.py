"""Document masking of packed sequences (Megatron's ``reset_attention_mask``), in a compact form.

A training sample packs several documents, each ending with its EOD token. Under
``data.reset_attention_mask`` a token attends only to the earlier tokens of its own document, as
Megatron-LM's dataset mask defines it: after an EOD at position ``i`` the tokens ``i + 1 ..`` see no
key ``<= i`` (the EOD belongs to the document it ends).

Megatron builds that mask densely (``[b, 1, s, s]``). Because documents are contiguous, causal
attention restricted to a document is causal attention with a per-query lower bound, so one integer
per position carries it: ``doc_start[b, p]``, the position of the first token of ``p``'s document.
That tensor (int64 ``[b, s]``, whole-sequence positions, also under context parallelism) is what the
forward step hands the model as ``attention_mask``; Megatron passes it through untouched to every
layer's core attention, and through activation recomputation and the SGT loops with it.

The kernels (:mod:`megatron_ext.models.kernels`) take it as ``key_start``: for each query row, the
first position of the key tensor it may see (0 without documents). A query then sees the keys
``max(key_start_i, i - W + 1) .. i`` under a sliding window ``W``, its document's first ``sink`` keys
under sink + recent attention (the sinks of a document are its own first tokens), and every key of its
document before it under full attention.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["document_starts", "document_starts_of", "key_starts", "visible_keys"]


def document_starts(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """``doc_start [b, s]`` (int64) of ``tokens [b, s]``: for position ``p`` the position after the last
    EOD before ``p`` (0 in the first document)."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq]; got {tuple(tokens.shape)}")
    b, s = tokens.shape
    after_eod = torch.arange(1, s + 1, device=tokens.device).expand(b, s)
    marks = torch.where(tokens == eod, after_eod, torch.zeros_like(after_eod))  # i + 1 at an EOD at i
    starts = torch.cummax(marks, dim=1).values  # after the last EOD at or before p
    return torch.cat([starts.new_zeros(b, 1), starts[:, :-1]], dim=1).contiguous()  # ... strictly before p


def document_starts_of(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The document starts a core attention was handed as ``attention_mask`` (None: none). A dense
    boolean mask is not this project's form: refused with what to do."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.int64 or attention_mask.dim() != 2:
        raise ValueError(
            f"this core attention takes document starts (int64 [batch, seq]) as attention_mask, not a "
            f"{attention_mask.dtype} tensor of shape {tuple(attention_mask.shape)}: document masking comes from "
            "data.reset_attention_mask; for a dense mask set model.attention_backend: local"
        )
    return attention_mask


def key_starts(doc_start: torch.Tensor, query_first: int, query_len: int, key_first: int) -> torch.Tensor:
    """``key_start [b, query_len]`` of the queries at sequence positions ``query_first ..`` over a key
    tensor whose index 0 is sequence position ``key_first``: each query's document start in the key
    tensor's coordinates (0 where the document began before the keys do)."""
    starts = doc_start[:, query_first : query_first + query_len] - key_first
    return starts.clamp_min(0).contiguous()


def visible_keys(
    q_len: int,
    k_len: int,
    key_start: Optional[torch.Tensor],
    window: Optional[int],
    sink: int,
    device: torch.device,
) -> torch.Tensor:
    """Which keys each query sees, densely: ``[Tq, Tk]`` without ``key_start``, else ``[b, 1, Tq, Tk]``.
    Query ``i`` sits at key position ``p = i + Tk - Tq`` and sees ``j <= p`` that is within the last
    ``window`` keys (any, for None) or among the first ``sink`` keys of its document, and (with
    ``key_start``) not before its document's start."""
    p = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    if key_start is None:
        first = torch.zeros((), dtype=torch.long, device=device)
    else:
        first = key_start.to(device)[:, None, :, None]  # [b, 1, Tq, 1]
    visible = (j <= p) & (j >= first)
    if window is not None:
        visible = visible & ((j >= p - window + 1) | (j < first + sink))
    return visible
