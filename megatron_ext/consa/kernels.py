"""Causal sliding-window attention (SWA): a dense reference, a blocked CPU training kernel, a dispatcher.

Conventions
-----------
* Tensors are ``[b, h, s, d]`` (batch, heads, sequence, head dim). fp32 is the reference dtype; bf16
  and fp16 work wherever torch's matmul and softmax support them on the tensors' device.
* Causal sliding window of size ``W >= 1``: query ``i`` attends to the keys ``j`` with
  ``i - W + 1 <= j <= i`` (``W`` keys including itself, fewer for ``i < W - 1``)::

      out_i = sum_j p_ij v_j,   p_ij = softmax_j(scale * q_i . k_j)   over j in [max(0, i - W + 1), i]

  ``W >= T`` is plain causal attention; ``W = 1`` returns ``v`` itself.
* GQA: ``q`` has ``hq`` heads, ``k`` and ``v`` have ``hkv`` heads with ``hq % hkv == 0``; query head
  ``h`` reads kv head ``h // (hq // hkv)``.
* ``scale`` defaults to ``1 / sqrt(d)``. There is no dropout.

Cost
----
The band holds ``sum_i min(i + 1, W) ~ T * W`` (query, key) pairs against ``T (T + 1) / 2`` in the
causal triangle; ``ideal_flop_ratio`` is that quotient. The blocked kernel's forward and backward both
do ``O(T * (W + bq))`` work, ``bq`` being its query block size.

Blocked kernel (``sliding_window_attention_blocked``)
-----------------------------------------------------
Queries are cut into blocks of ``bq`` positions. Block ``[s, e)`` only reads the keys
``[max(0, s - W + 1), e)``, a contiguous slice of ``K`` and ``V`` that goes to ``torch.bmm`` as a view,
without a copy. Per block, with ``L <= bq + W - 1`` window keys::

    S   = (scale q_blk) K_win^T + M          [B, r, L]   M: 0 in the band, -inf outside
    P   = softmax(S)                         [B, r, L]
    O   = P V_win                            [B, r, d]

The band mask only bites in two slabs of ``bq - 1`` columns (the oldest keys, which only the first
rows still reach, and the newest, which only the last rows already reach); the ``W - bq + 1`` columns
between them are visible to every row of the block, so only the slabs get ``M`` added.

The backward is explicit (a ``torch.autograd.Function``) and recomputes ``S`` and ``P`` block by block,
so nothing of size ``T x W`` outlives a block; the saved state is ``q``, ``k``, ``v`` and the output::

    dV_win += P^T dO_blk
    dP      = dO_blk V_win^T
    dS      = P * (dP - delta),   delta_i = dO_i . O_i   (= sum_j p_ij dP_ij)
    dQ_blk  = scale dS K_win
    dK_win += dS^T (scale q_blk)

GQA needs no repeated ``k``/``v``: the ``g = hq / hkv`` query heads that share a kv head are
interleaved as the rows ``t * g + j`` of a ``[b * hkv, T * g, d]`` matrix, so a block of ``bq``
positions is ``bq * g`` contiguous rows that read their kv window once.

Per-block buffers (scores, probabilities, small products) are allocated once per call and reused:
allocating a fresh megabyte-sized block result each time costs page faults worth about a third of
the block's matmul time on CPU.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "causal_attention",
    "ideal_flop_ratio",
    "sliding_window_attention",
    "sliding_window_attention_blocked",
    "sliding_window_attention_reference",
]

DEFAULT_BLOCK_SIZE = 64
"""Query block of the CPU kernel: the extra ``bq - 1`` key columns per block cost ~12% at ``W = 512``,
while smaller blocks lose more to matmul efficiency and per-block overhead."""


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [b, h, s, d]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, sequence or head dim")
    if hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an integer >= 1; got {window!r}")


def _scale_or_default(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def ideal_flop_ratio(seq_len: int, window: int) -> float:
    """(query, key) pairs in the band over pairs in the causal triangle: ``sum_i min(i+1, W) / (T(T+1)/2)``."""
    if seq_len < 1 or window < 1:
        raise ValueError(f"seq_len and window must be >= 1; got {seq_len}, {window}")
    w = min(window, seq_len)
    band = w * (w + 1) // 2 + (seq_len - w) * w  # rows i < w see i + 1 keys, the rest see w
    return band / (seq_len * (seq_len + 1) // 2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Full causal attention ``[b, hq, s, d]`` through ``scaled_dot_product_attention(is_causal=True)``."""
    _check_inputs(q, k, v, None)
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=_scale_or_default(q, scale), enable_gqa=q.shape[1] != k.shape[1]
    )


def sliding_window_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: Optional[float] = None
) -> torch.Tensor:
    """Dense O(T^2) reference: full score matrix, explicit band mask, softmax, weighted sum of ``v``.

    q: [b, hq, T, d]; k, v: [b, hkv, T, d]; returns [b, hq, T, d]. Differentiable through autograd.
    """
    _check_inputs(q, k, v, window)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [b, hq, T, d]: query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    t = q.shape[2]
    i = torch.arange(t, device=q.device)[:, None]
    j = torch.arange(t, device=q.device)[None, :]
    in_band = (j <= i) & (j >= i - window + 1)  # [T, T]
    scores = torch.matmul(q, k.transpose(-1, -2)) * _scale_or_default(q, scale)  # [b, hq, T, T]
    scores = scores.masked_fill(~in_band, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


# --------------------------------------------------------------------------------------------------
# Blocked CPU kernel
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _band_template(block: int, window: int, group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive band mask of a full query block against its full key window, [block * group, block + window - 1].

    Row ``r * group + j`` is query ``s + r`` (any of the ``group`` heads), column ``c`` is key
    ``s - window + 1 + c``; the entry is 0 where ``r <= c <= r + window - 1`` and -inf elsewhere.
    """
    r = torch.arange(block, device=device)[:, None]
    c = torch.arange(block + window - 1, device=device)[None, :]
    visible = (c >= r) & (c <= r + window - 1)
    bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return bias.repeat_interleave(group, dim=0)


def _blocks(seq_len: int, window: int, block: int) -> Iterator[Tuple[int, int, int, int]]:
    """(s, e, ks, offset) per query block [s, e): its keys are [ks, e); ``offset`` = ks - (s - window + 1)
    is how many template columns the clipping at position 0 cut off."""
    for s in range(0, seq_len, block):
        e = min(seq_len, s + block)
        ks = max(0, s - window + 1)
        yield s, e, ks, ks - (s - window + 1)


def _add_band_mask_(scores: torch.Tensor, template: torch.Tensor, n_query: int, offset: int, window: int) -> None:
    """Add the band mask in place to one block's scores [B, n_query * group, n_key]."""
    n_key = scores.shape[-1]
    bias = template[: scores.shape[1], offset : offset + n_key]
    left = n_query - 1 - offset  # columns [0, left): keys that the first rows reach and the last no longer do
    right = window - offset  # columns [right, n_key): keys after the first rows, reached by the last ones
    if left >= right:  # window < block: the slabs meet, mask the whole block
        scores.add_(bias)
        return
    if left > 0:
        scores[..., :left].add_(bias[:, :left])
    if right < n_key:
        scores[..., right:].add_(bias[:, right:])


def _to_rows(x: torch.Tensor, kv_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """[b, hq, T, d] -> [b * hkv, T * g, d], row ``t * g + j`` holding head ``kv * g + j`` at position ``t``,
    optionally times ``scale`` (fused into the one copy)."""
    b, hq, t, d = x.shape
    group = hq // kv_heads
    if group == 1 and scale is None:
        return x.contiguous().view(b * kv_heads, t, d)
    rows = x.new_empty(b, kv_heads, t, group, d)
    src = x.unflatten(1, (kv_heads, group)).transpose(2, 3)  # [b, hkv, T, g, d], a view
    if scale is None:
        rows.copy_(src)
    else:
        torch.mul(src, scale, out=rows)
    return rows.view(b * kv_heads, t * group, d)


def _from_rows(rows: torch.Tensor, batch: int, heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """Inverse of ``_to_rows``: [b * hkv, T * g, d] -> contiguous [b, hq, T, d], optionally times ``scale``."""
    group = heads * batch // rows.shape[0]
    t, d = rows.shape[1] // group, rows.shape[2]
    if group == 1 and scale is None:
        return rows.view(batch, heads, t, d)
    out = rows.new_empty(batch, heads // group, group, t, d)
    src = rows.view(batch, heads // group, t, group, d).transpose(2, 3)  # [b, hkv, g, T, d], a view
    if scale is None:
        out.copy_(src)
    else:
        torch.mul(src, scale, out=out)
    return out.view(batch, heads, t, d)


def _workspace(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous tensor of ``shape`` on the front of a flat reusable buffer."""
    return buffer[: math.prod(shape)].view(shape)


class _BlockedSlidingWindowAttention(torch.autograd.Function):
    """Blocked SWA with a recomputing backward; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float, block: int):
        b, hq, t, d = q.shape
        kv_heads = k.shape[1]
        group = hq // kv_heads
        q_rows = _to_rows(q, kv_heads, scale)  # [B, T*g, d], pre-scaled so scores need no extra pass
        k_rows = k.contiguous().view(b * kv_heads, t, d)  # [B, T, d]
        v_rows = v.contiguous().view(b * kv_heads, t, d)
        n_batch = q_rows.shape[0]
        template = _band_template(block, window, group, q.dtype, q.device)
        max_rows, max_keys = block * group, min(block + window - 1, t)
        scores_buf = q.new_empty(n_batch * max_rows * max_keys)
        out_buf = q.new_empty(n_batch * max_rows * d)
        out_rows = torch.empty_like(q_rows)
        for s, e, ks, offset in _blocks(t, window, block):
            rows = slice(s * group, e * group)
            shape = (n_batch, (e - s) * group, e - ks)
            scores = torch.bmm(q_rows[:, rows], k_rows[:, ks:e].transpose(1, 2), out=_workspace(scores_buf, *shape))
            _add_band_mask_(scores, template, e - s, offset, window)
            # In place: the row-wise softmax kernel reads each element before writing it, and one buffer
            # instead of two keeps the block's working set in cache.
            probs = torch.softmax(scores, dim=-1, out=scores)
            out_rows[:, rows] = torch.bmm(probs, v_rows[:, ks:e], out=_workspace(out_buf, shape[0], shape[1], d))
        out = _from_rows(out_rows, b, hq)
        ctx.save_for_backward(q_rows, k_rows, v_rows, out)
        ctx.window, ctx.scale, ctx.block = window, scale, block
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q_rows, k_rows, v_rows, out = ctx.saved_tensors
        window, scale, block = ctx.window, ctx.scale, ctx.block
        b, hq, t, d = out.shape
        kv_heads = k_rows.shape[0] // b
        group = hq // kv_heads
        n_batch = q_rows.shape[0]
        dout_rows = _to_rows(grad_out, kv_heads)  # [B, T*g, d]
        delta = _to_rows((grad_out * out).sum(-1, keepdim=True), kv_heads)  # [B, T*g, 1]: dO_i . O_i
        template = _band_template(block, window, group, q_rows.dtype, q_rows.device)
        max_rows, max_keys = block * group, min(block + window - 1, t)
        probs_buf = q_rows.new_empty(n_batch * max_rows * max_keys)
        scores_buf = torch.empty_like(probs_buf)  # holds S, then dP / dS of the same block
        kv_buf = q_rows.new_empty(n_batch * max_keys * d)
        q_buf = q_rows.new_empty(n_batch * max_rows * d)
        dq_rows = torch.empty_like(q_rows)
        dk_rows = torch.zeros_like(k_rows)
        dv_rows = torch.zeros_like(v_rows)
        for s, e, ks, offset in _blocks(t, window, block):
            rows = slice(s * group, e * group)
            shape = (n_batch, (e - s) * group, e - ks)
            q_blk, dout_blk = q_rows[:, rows], dout_rows[:, rows]  # [B, r, d]
            k_win, v_win = k_rows[:, ks:e], v_rows[:, ks:e]  # [B, L, d]
            scores = torch.bmm(q_blk, k_win.transpose(1, 2), out=_workspace(scores_buf, *shape))
            _add_band_mask_(scores, template, e - s, offset, window)
            probs = torch.softmax(scores, dim=-1, out=_workspace(probs_buf, *shape))
            dv_rows[:, ks:e].add_(torch.bmm(probs.transpose(1, 2), dout_blk, out=_workspace(kv_buf, n_batch, e - ks, d)))
            dprobs = torch.bmm(dout_blk, v_win.transpose(1, 2), out=scores)
            dscores = dprobs.sub_(delta[:, rows]).mul_(probs)  # softmax backward, in place
            dq_rows[:, rows] = torch.bmm(dscores, k_win, out=_workspace(q_buf, *shape[:2], d))
            dk_rows[:, ks:e].add_(torch.bmm(dscores.transpose(1, 2), q_blk, out=_workspace(kv_buf, n_batch, e - ks, d)))
        grad_q = _from_rows(dq_rows, b, hq, scale)
        return grad_q, dk_rows.view(b, kv_heads, t, d), dv_rows.view(b, kv_heads, t, d), None, None, None


def sliding_window_attention_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: Optional[float] = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Causal sliding-window attention in O(T * W) time and memory, forward and backward (CPU training path).

    q: [b, hq, T, d]; k, v: [b, hkv, T, d]; returns [b, hq, T, d]. ``block_size`` is the query block
    ``bq``; each block costs ``bq * (bq + W - 1)`` scores. Matches ``sliding_window_attention_reference``.
    """
    _check_inputs(q, k, v, window)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    t = q.shape[2]
    # A window past the sequence changes nothing and would only widen the mask template.
    return _BlockedSlidingWindowAttention.apply(q, k, v, min(window, t), _scale_or_default(q, scale), block_size)


# --------------------------------------------------------------------------------------------------
# GPU path and dispatcher
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    # Imported lazily: CPU runs never touch FlexAttention or the compiler. Compiled, it runs as one
    # fused kernel that skips the blocks outside the band; eager, it would materialize all T^2 scores.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _sliding_window_block_mask(seq_len: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_window_causal(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(sliding_window_causal, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: Optional[float] = None
) -> torch.Tensor:
    """Causal sliding-window attention on whichever device the tensors live.

    q: [b, hq, T, d]; k, v: [b, hkv, T, d]; returns [b, hq, T, d].

    * CUDA: ``torch.nn.attention.flex_attention`` (compiled) with a block mask for
      ``kv_idx <= q_idx and q_idx - kv_idx < window``, cached per (T, window, device); GQA through
      ``enable_gqa``.
    * CPU: ``sliding_window_attention_blocked``. FlexAttention has no CPU backward in torch 2.13 (its
      CPU path is inference only), so training on CPU needs the blocked kernel with its own backward.
    """
    _check_inputs(q, k, v, window)
    if q.is_cuda:
        mask = _sliding_window_block_mask(q.shape[2], window, q.device)
        flex = _compiled_flex_attention()
        return flex(q, k, v, block_mask=mask, scale=_scale_or_default(q, scale), enable_gqa=q.shape[1] != k.shape[1])
    return sliding_window_attention_blocked(q, k, v, window, scale)
