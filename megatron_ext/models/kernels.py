"""Causal sliding-window attention (SWA): a dense reference, a blocked CPU training kernel, a dispatcher.

Conventions
-----------
* Tensors are ``[b, h, s, d]`` (batch, heads, sequence, head dim). fp32 is the reference dtype; bf16
  and fp16 work wherever torch's matmul and softmax support them on the tensors' device.
* Causal sliding window of size ``W >= 1``: query ``i`` attends to the keys ``j`` with
  ``i - W + 1 <= j <= i`` (``W`` keys including itself, fewer for ``i < W - 1``)::

      out_i = sum_j p_ij v_j,   p_ij = softmax_j(scale * q_i . k_j)   over j in [max(0, i - W + 1), i]

  ``W >= T`` is plain causal attention; ``W = 1`` returns ``v`` itself.
* ``k`` and ``v`` may hold more positions than ``q`` (``Tk >= Tq``): the queries are then the last
  ``Tq`` of the ``Tk`` key positions, query ``i`` sitting at key position ``i + Tk - Tq``. This is a
  sequence chunk with the keys before it (its whole prefix for full attention, a halo of ``W - 1``
  for a window), as context parallelism hands it over; ``Tk == Tq`` is the whole sequence.
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
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_ext.models import fused_swa
from megatron_ext.models.documents import visible_keys

__all__ = [
    "causal_attention",
    "causal_attention_reference",
    "ideal_flop_ratio",
    "sink_window_attention",
    "sink_window_attention_reference",
    "sliding_window_attention",
    "sliding_window_attention_blocked",
    "window_kernel_pairs",
    "sliding_window_attention_reference",
]

DEFAULT_BLOCK_SIZE = 80
"""Query block ``bq`` of the CPU kernels (blocked and fused). A block computes ``bq - 1`` more key
columns than its rows can see (~15% at ``W = 512``); smaller blocks save that but lose more to
per-block overhead and smaller matmuls. For the blocked kernel 80 measured best or tied among 16-128
for ``W`` from 32 to 2048 (T = 4096, 2 threads); the fused kernel measured within noise from 48 to 128
at T = 4096 and 8192, W = 512."""


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int], key_start: Optional[torch.Tensor] = None
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
        raise ValueError(f"q, k, v must be [b, h, s, d]; got {shapes}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[2] < t or k.shape[3] != d:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim, or k holds fewer positions than q"
        )
    if hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an integer >= 1; got {window!r}")
    if key_start is not None and (key_start.dtype != torch.int64 or tuple(key_start.shape) != (b, t)):
        raise ValueError(f"key_start must be int64 [b, Tq] = {[b, t]}; got {key_start.dtype} {tuple(key_start.shape)}")


def _scale_or_default(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def ideal_flop_ratio(seq_len: int, window: int) -> float:
    """Pairs (query, key) in the band over pairs in the causal triangle.

    ``sum_i min(i + 1, W) / (T (T + 1) / 2)``: the share of causal attention's FLOPs that an exact
    SWA kernel cannot avoid.
    """
    if seq_len < 1 or window < 1:
        raise ValueError(f"seq_len and window must be >= 1; got {seq_len}, {window}")
    w = min(window, seq_len)
    band = w * (w + 1) // 2 + (seq_len - w) * w  # rows i < w see i + 1 keys, the rest see w
    return band / (seq_len * (seq_len + 1) // 2)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Full causal attention ``[b, hq, Tq, d]`` through ``scaled_dot_product_attention``: ``is_causal``
    when ``Tk == Tq``; for the last ``Tq`` queries of ``Tk`` keys, the causal mask aligned to the
    bottom right (query ``i`` sees keys ``j <= i + Tk - Tq``), which ``is_causal`` (top left) is not:
    torch's ``causal_lower_right`` bias, which runs the flash / memory-efficient kernels on GPU
    without a materialized mask (on CPU it becomes the boolean mask). ``key_start [b, Tq]``
    (document masking, :mod:`~megatron_ext.models.documents`): each query's first visible key, as a
    boolean ``[b, 1, Tq, Tk]`` mask."""
    from torch.nn.attention.bias import causal_lower_right

    _check_inputs(q, k, v, None, key_start)
    tq, tk = q.shape[2], k.shape[2]
    if key_start is not None:
        mask = visible_keys(tq, tk, key_start, None, 0, q.device)
    else:
        mask = None if tq == tk else causal_lower_right(tq, tk)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None,
        scale=_scale_or_default(q, scale),
        enable_gqa=q.shape[1] != k.shape[1],
    )


def sliding_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense O(T^2) reference: full score matrix, explicit band mask, softmax, weighted sum of ``v``.

    q: [b, hq, Tq, d]; k, v: [b, hkv, Tk, d] (``Tk >= Tq``, see the module doc); returns [b, hq, Tq, d].
    ``key_start [b, Tq]``: each query's first visible key (document masking). Differentiable through
    autograd.
    """
    _check_inputs(q, k, v, window, key_start)
    return _dense_reference(q, k, v, visible_keys(q.shape[2], k.shape[2], key_start, window, 0, q.device), scale)


def _dense_reference(q, k, v, visible: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    """Softmax attention under the boolean ``visible`` mask, with explicit scores (GQA by repetition)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [b, hq, Tk, d]: query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * _scale_or_default(q, scale)  # [b, hq, Tq, Tk]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def causal_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense reference of full causal attention (optionally document-masked by ``key_start``)."""
    _check_inputs(q, k, v, None, key_start)
    return _dense_reference(q, k, v, visible_keys(q.shape[2], k.shape[2], key_start, None, 0, q.device), scale)


def sink_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sink: int,
    scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dense reference of sink + recent attention (LoZA's sparse pattern): query ``i`` sees the keys
    ``j <= i`` with ``j < sink`` (the attention sinks) or ``j >= i - window + 1`` (the recent ones);
    under document masking (``key_start``) the sinks are the first ``sink`` keys of its document.

    q: [b, hq, Tq, d]; k, v: [b, hkv, Tk, d] (``Tk >= Tq``: the queries are the last ``Tq`` positions);
    returns [b, hq, Tq, d]. Explicit score matrix and softmax.
    """
    _check_inputs(q, k, v, window, key_start)
    return _dense_reference(q, k, v, visible_keys(q.shape[2], k.shape[2], key_start, window, sink, q.device), scale)


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sink: int,
    scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sink + recent attention (see :func:`sink_window_attention_reference`) through torch's
    ``scaled_dot_product_attention`` with the boolean mask. [choice] Dense cost: the LoZA baseline is
    compared on quality here, and this path does not claim sparse attention's savings. ``Tk >= Tq`` as
    for the other kernels."""
    _check_inputs(q, k, v, window, key_start)
    mask = visible_keys(q.shape[2], k.shape[2], key_start, window, sink, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=_scale_or_default(q, scale), enable_gqa=q.shape[1] != k.shape[1]
    )


# --------------------------------------------------------------------------------------------------
# Blocked CPU kernel
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _band_template(block: int, window: int, group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive band mask of a full query block against its full key window.

    Shape [block * group, block + window - 1].
    Row ``r * group + j`` is query ``s + r`` (any of the ``group`` heads), column ``c`` is key
    ``s - window + 1 + c``; the entry is 0 where ``r <= c <= r + window - 1`` and -inf elsewhere.
    """
    r = torch.arange(block, device=device)[:, None]
    c = torch.arange(block + window - 1, device=device)[None, :]
    visible = (c >= r) & (c <= r + window - 1)
    bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return bias.repeat_interleave(group, dim=0)


class _Block(NamedTuple):
    """One query block [start, stop) and the keys [key_start, key_stop) it reads."""

    start: int
    stop: int
    key_start: int
    key_stop: int
    mask: Tuple[Tuple[slice, torch.Tensor], ...]  # (score columns, additive bias [rows, columns]) to add


def _block_plan(
    seq_len: int, window: int, block: int, group: int, template: torch.Tensor, q_offset: int = 0
) -> List[_Block]:
    """Query blocks with their key ranges and the pieces of the band mask their scores need.

    ``seq_len`` queries, query ``i`` at key position ``i + q_offset``. Template column ``c`` of block
    ``[s, e)`` is key ``s + q_offset - window + 1 + c``; keys before 0 are not read, which cuts
    ``offset`` columns off the front. Only two column slabs can hold masked entries: the oldest
    ``e - s - 1`` keys, which the first rows reach and the last no longer do, and the keys from
    template column ``window`` on, past the first rows' own positions. Interior blocks share one set
    of bias views.
    """
    plan, masks = [], {}
    for s in range(0, seq_len, block):
        e = min(seq_len, s + block)
        first = s + q_offset - window + 1  # key of template column 0
        ks = max(0, first)
        n_query, offset, n_key = e - s, ks - first, e + q_offset - ks
        key = (n_query, offset, n_key)
        if key not in masks:
            bias = template[: n_query * group, offset : offset + n_key]
            left = n_query - 1 - offset  # score columns [0, left): the oldest-keys slab
            right = window - offset  # score columns [right, n_key): the newest-keys slab
            if left >= right:  # window < block: the slabs meet, the whole block is masked
                pieces = [(slice(None), bias)]
            else:
                pieces = [(slice(0, left), bias[:, :left])] if left > 0 else []
                if right < n_key:
                    pieces.append((slice(right, n_key), bias[:, right:]))
            masks[key] = tuple(pieces)
        plan.append(_Block(s, e, ks, e + q_offset, masks[key]))
    return plan


def _add_band_mask_(scores: torch.Tensor, block: _Block) -> None:
    """Add the band mask in place to one block's scores [B, rows, keys]."""
    for columns, bias in block.mask:
        scores[..., columns].add_(bias)


def _document_mask(key_start: Optional[torch.Tensor], block: _Block, kv_heads: int, group: int):
    """``[B, rows, keys]`` True where a row of ``block`` reaches back past its document's start (None when
    no row does, or without documents): the document mask on top of the band (rows as in ``_to_rows``)."""
    if key_start is None:
        return None
    first = key_start[:, block.start : block.stop]  # [b, n] in key positions
    if int(first.max()) <= block.key_start:
        return None
    keys = torch.arange(block.key_start, block.key_stop, device=key_start.device)
    hidden = keys.view(1, 1, -1) < first.unsqueeze(-1)  # [b, n, L]
    b, n, length = hidden.shape
    return hidden[:, None, :, None, :].expand(b, kv_heads, n, group, length).reshape(b * kv_heads, n * group, length)


def _mask_block_(scores: torch.Tensor, block: _Block, key_start, kv_heads: int, group: int) -> None:
    """The band mask, and the document mask where a document starts inside the block's keys, in place."""
    _add_band_mask_(scores, block)
    hidden = _document_mask(key_start, block, kv_heads, group)
    if hidden is not None:
        scores.masked_fill_(hidden, float("-inf"))


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
    """Inverse of ``_to_rows``: [b * hkv, T * g, d] -> contiguous [b, hq, T, d], optionally scaled."""
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
    def forward(ctx, q, k, v, window: int, scale: float, block: int, key_start: Optional[torch.Tensor]):
        b, hq, t, d = q.shape
        kv_heads, tk = k.shape[1], k.shape[2]
        group = hq // kv_heads
        q_rows = _to_rows(q, kv_heads, scale)  # [B, Tq*g, d], pre-scaled so the scores need no extra pass
        k_rows = k.contiguous().view(b * kv_heads, tk, d)  # [B, Tk, d]
        v_rows = v.contiguous().view(b * kv_heads, tk, d)
        n_batch = q_rows.shape[0]
        plan = _block_plan(
            t, window, block, group, _band_template(block, window, group, q.dtype, q.device), q_offset=tk - t
        )
        max_rows, max_keys = block * group, min(block + window - 1, tk)
        scores_buf = q.new_empty(n_batch * max_rows * max_keys)
        out_buf = q.new_empty(n_batch * max_rows * d)
        out_rows = torch.empty_like(q_rows)
        for blk in plan:
            rows = slice(blk.start * group, blk.stop * group)
            shape = (n_batch, rows.stop - rows.start, blk.key_stop - blk.key_start)  # [B, r, L]
            k_win = k_rows[:, blk.key_start : blk.key_stop]  # [B, L, d], a view
            scores = torch.bmm(q_rows[:, rows], k_win.transpose(1, 2), out=_workspace(scores_buf, *shape))
            _mask_block_(scores, blk, key_start, kv_heads, group)
            # In place: along the last dim each output element only replaces the score it is computed
            # from (after the row max is known), and one buffer instead of two keeps the block in cache.
            probs = torch.softmax(scores, dim=-1, out=scores)
            v_win = v_rows[:, blk.key_start : blk.key_stop]
            out_rows[:, rows] = torch.bmm(probs, v_win, out=_workspace(out_buf, *shape[:2], d))
        out = _from_rows(out_rows, b, hq)
        ctx.save_for_backward(q_rows, k_rows, v_rows, out)
        ctx.plan, ctx.scale, ctx.max_rows, ctx.max_keys = plan, scale, max_rows, max_keys
        ctx.key_start = key_start
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q_rows, k_rows, v_rows, out = ctx.saved_tensors
        b, hq, _, d = out.shape
        tk = k_rows.shape[1]
        n_batch = k_rows.shape[0]
        kv_heads = n_batch // b
        group = hq // kv_heads
        dout_rows = _to_rows(grad_out, kv_heads)  # [B, T*g, d]
        delta = _to_rows((grad_out * out).sum(-1, keepdim=True), kv_heads)  # [B, T*g, 1]: dO_i . O_i
        probs_buf = q_rows.new_empty(n_batch * ctx.max_rows * ctx.max_keys)
        scores_buf = torch.empty_like(probs_buf)  # S of a block, then its dP and dS
        kv_buf = q_rows.new_empty(n_batch * ctx.max_keys * d)  # one window's dK or dV
        q_buf = q_rows.new_empty(n_batch * ctx.max_rows * d)  # one block's dQ
        dq_rows = torch.empty_like(q_rows)
        dk_rows = torch.zeros_like(k_rows)
        dv_rows = torch.zeros_like(v_rows)
        for blk in ctx.plan:
            rows = slice(blk.start * group, blk.stop * group)
            n_rows, n_keys = rows.stop - rows.start, blk.key_stop - blk.key_start
            keys = slice(blk.key_start, blk.key_stop)
            q_blk, dout_blk = q_rows[:, rows], dout_rows[:, rows]  # [B, r, d]
            k_win, v_win = k_rows[:, keys], v_rows[:, keys]  # [B, L, d]
            scores_out = _workspace(scores_buf, n_batch, n_rows, n_keys)
            scores = torch.bmm(q_blk, k_win.transpose(1, 2), out=scores_out)
            _mask_block_(scores, blk, ctx.key_start, kv_heads, group)
            probs = torch.softmax(scores, dim=-1, out=_workspace(probs_buf, n_batch, n_rows, n_keys))
            dv_win = torch.bmm(probs.transpose(1, 2), dout_blk, out=_workspace(kv_buf, n_batch, n_keys, d))
            dv_rows[:, keys].add_(dv_win)
            dprobs = torch.bmm(dout_blk, v_win.transpose(1, 2), out=scores)
            dscores = dprobs.sub_(delta[:, rows]).mul_(probs)  # softmax backward, in place
            dq_rows[:, rows] = torch.bmm(dscores, k_win, out=_workspace(q_buf, n_batch, n_rows, d))
            dk_win = torch.bmm(dscores.transpose(1, 2), q_blk, out=_workspace(kv_buf, n_batch, n_keys, d))
            dk_rows[:, keys].add_(dk_win)
        grad_q = _from_rows(dq_rows, b, hq, scale=ctx.scale)  # dS was taken w.r.t. the pre-scaled q
        return grad_q, dk_rows.view(b, kv_heads, tk, d), dv_rows.view(b, kv_heads, tk, d), None, None, None, None


def sliding_window_attention_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: Optional[float] = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal sliding-window attention in O(T * W) time and memory, forward and backward (CPU training path).

    q: [b, hq, Tq, d]; k, v: [b, hkv, Tk, d] (``Tk >= Tq``: the queries are the last ``Tq`` positions);
    returns [b, hq, Tq, d]. ``block_size`` is the query block ``bq``; each block costs
    ``bq * (bq + W - 1)`` scores. ``key_start [b, Tq]``: each query's first visible key (document
    masking; a block whose keys all lie in its rows' documents adds nothing). Matches
    ``sliding_window_attention_reference``.
    """
    _check_inputs(q, k, v, window, key_start)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    # A window past the keys changes nothing and would only widen the mask template.
    scale = _scale_or_default(q, scale)
    return _BlockedSlidingWindowAttention.apply(q, k, v, min(window, k.shape[2]), scale, block_size, key_start)


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
def _sliding_window_block_mask(q_len: int, kv_len: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = kv_len - q_len  # query i sits at key position i + offset

    def sliding_window_causal(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx + offset) & (q_idx + offset - kv_idx < window)

    return create_block_mask(sliding_window_causal, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


def document_window_mask_mod(q_len: int, kv_len: int, window: int, key_start: torch.Tensor):
    """FlexAttention ``mask_mod`` of a sliding window under document masking: the band of
    ``_sliding_window_block_mask`` and ``kv_idx >= key_start[batch, q_idx]``."""
    offset = kv_len - q_len

    def document_sliding_window(batch, head, q_idx, kv_idx):
        band = (kv_idx <= q_idx + offset) & (q_idx + offset - kv_idx < window)
        return band & (kv_idx >= key_start[batch, q_idx])

    return document_sliding_window


def _document_window_block_mask(q_len: int, kv_len: int, window: int, key_start: torch.Tensor):
    """A block mask per batch (documents differ per sample): built for each call, not cached."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = document_window_mask_mod(q_len, kv_len, window, key_start)
    b = key_start.shape[0]
    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=key_start.device)


def window_kernel_pairs(
    seq_len: int, window: int, block_size: int = DEFAULT_BLOCK_SIZE, kv_len: Optional[int] = None
) -> int:
    """(query, key) score pairs per head and sequence that the CPU window kernels (blocked and fused)
    multiply: per query block ``[s, e)`` its rows times the keys ``[max(0, s + o - W + 1), e + o)``,
    ``o = kv_len - seq_len`` (about ``T (W + bq)``; the band itself holds ``~T W``). For FLOP counts
    that match the kernels."""
    offset = (seq_len if kv_len is None else kv_len) - seq_len
    window = min(window, seq_len + offset)
    pairs = 0
    for start in range(0, seq_len, block_size):
        rows = min(block_size, seq_len - start)
        pairs += rows * (start + rows + offset - max(0, start + offset - window + 1))
    return pairs


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: Optional[float] = None,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal sliding-window attention on whichever device the tensors live.

    q: [b, hq, Tq, d]; k, v: [b, hkv, Tk, d] (``Tk >= Tq``: the queries are the last ``Tq`` positions);
    returns [b, hq, Tq, d].

    * CUDA: ``torch.nn.attention.flex_attention`` (compiled) with a block mask for
      ``kv_idx <= q_idx + Tk - Tq < kv_idx + window``, cached per (Tq, Tk, window, device); GQA through
      ``enable_gqa``.
    * CPU, float32: the fused C++ kernel (:mod:`megatron_ext.models.fused_swa`), built on first use;
      other dtypes, or where it cannot be built: ``sliding_window_attention_blocked``. FlexAttention
      has no CPU backward in torch 2.13 (its CPU path is inference only), so training on CPU needs a
      kernel with its own backward.

    ``key_start [b, Tq]`` (int64; document masking, :mod:`~megatron_ext.models.documents`): each query's
    first visible key, honoured by all three (a per-sample block mask on CUDA).
    """
    _check_inputs(q, k, v, window, key_start)
    if q.is_cuda:
        if key_start is None:
            mask = _sliding_window_block_mask(q.shape[2], k.shape[2], window, q.device)
        else:
            mask = _document_window_block_mask(q.shape[2], k.shape[2], window, key_start)
        flex = _compiled_flex_attention()
        gqa = q.shape[1] != k.shape[1]
        return flex(q, k, v, block_mask=mask, scale=_scale_or_default(q, scale), enable_gqa=gqa)
    if key_start is not None:
        _check_key_start_causal(key_start, q.shape[2], k.shape[2])
    if fused_swa.runs(q, k, v):
        return fused_swa.fused_sliding_window_attention(
            q, k, v, window, _scale_or_default(q, scale), DEFAULT_BLOCK_SIZE, key_start
        )
    return sliding_window_attention_blocked(q, k, v, window, scale, key_start=key_start)


def _check_key_start_causal(key_start: torch.Tensor, q_len: int, k_len: int) -> None:
    """Every query must see itself: ``0 <= key_start[:, i] <= i + Tk - Tq`` (else a row of the CPU
    kernels would have no key to normalize over)."""
    positions = torch.arange(k_len - q_len, k_len, device=key_start.device)
    if bool((key_start < 0).any()) or bool((key_start > positions).any()):
        raise ValueError("key_start must lie in [0, the query's own key position] for every query")
