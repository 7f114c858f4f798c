"""Hybrid full / sliding-window core attention, as a Megatron ``core_attention`` module.

Same call contract as Megatron's ``DotProductAttention``: ``forward(query, key, value,
attention_mask, ...)`` with query ``[s, b, np, hn]`` and key / value ``[s, b, ng, hn]`` (this
rank's heads after the TP split), returning ``[s, b, np * hn]``. Each layer is in one of three
modes, set by the ConSA callback (default: full):

* ``full``    causal attention for every head;
* ``gated``   (mask learning) every unit mixes both outputs by its gate z, the training form of
              ConSA (arXiv 2606.18056) [digest]
              ``out_u = z_u * FA_u(q, k, v) + (1 - z_u) * SWA_u(q, k, v)``; a unit is the layer
              (one z) or a KV head (its z is shared by the query heads of its group);
* ``static``  (after binarization) each KV head runs one kernel, so SWA heads really cost O(s * W).

Kernels [choice]: on the CPU (float32, this project's backend, no CP, no sinks) a gated layer computes
both outputs in one pass of the fused kernel (:mod:`~megatron_ext.models.fused_swa`, dual mode: the
window's scores are part of the full ones, computed once), and a static mixed layer is one call with a
window per KV head, its threads balanced by cost. Elsewhere (CUDA, TE, CP, sinks) the FA heads and the
SWA heads are computed as two groups, each by its own kernel; ``fused = False`` does that on the CPU too,
the reference the tests compare the one-pass forms with.

Window convention [choice]: a query at position i sees keys i - W + 1 .. i (W keys, itself included).
Under TP a rank holds KV heads ``[tp_rank * ng_local, (tp_rank + 1) * ng_local)`` and uses the
gates / allocation of exactly those heads, so heads and their gates are sharded together.
Under context parallelism (CP) a rank holds two chunks of the sequence
(:mod:`megatron_ext.parallel.context`): full-attention heads all-gather their keys and values,
sliding-window heads fetch only a halo of ``W - 1`` positions per chunk
(:func:`~megatron_ext.models.context_attention.context_parallel_attention`); a static mixed layer
exchanges each group's heads by its own scheme, so its SWA heads keep their smaller traffic.

Document masking (``data.reset_attention_mask``) arrives as ``attention_mask``, the document starts
of :mod:`~megatron_ext.models.documents`; every unit honours it, whichever kernel it runs (the sinks of
a sink + recent unit are its document's first keys). The ``te`` backend does not take it.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_ext.models import fused_swa
from megatron_ext.models.context_attention import context_parallel_attention
from megatron_ext.models.documents import document_starts_of
from megatron_ext.models.kernels import (
    DEFAULT_BLOCK_SIZE,
    causal_attention,
    sink_window_attention,
    sliding_window_attention,
)
from megatron_ext.models.protocols import (
    AttentionPairCounter,
    HeadSubsetAttention,
    KeyPlan,
    KeyPlanAttention,
    QueryHeadSubsetAttention,
)
from megatron_ext.models.te_attention import TEKernels
from megatron_ext.parallel.context import context_parallel_of


class HybridCoreAttention(
    MegatronModule, HeadSubsetAttention, QueryHeadSubsetAttention, KeyPlanAttention, AttentionPairCounter
):
    """Core attention whose KV heads use full causal or sliding-window attention (see module doc), with
    the core-attention protocols of :mod:`megatron_ext.models.protocols`."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type="self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type=None,
        pg_collection=None,
        *,
        window: int,
        sink: int = 0,
        backend: str = "local",
    ):
        super().__init__(config=config)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("hybrid attention does not implement attention dropout: set model.attention_dropout: 0")
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        if pg_collection is None:  # built outside an Attention module: this rank's groups
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp = context_parallel_of(pg_collection)
        tp_size, tp_rank = get_pg_size(pg_collection.tp), get_pg_rank(pg_collection.tp)
        self.layer_index = layer_number - 1  # Megatron numbers layers from 1
        self.window = window
        self.sink = sink
        """Attention sinks of the sparse units: 0 for sliding-window attention; > 0 for LoZA's sink +
        recent attention (the first ``sink`` keys and the last ``window``)."""
        self.head_dim = config.kv_channels
        self.num_kv_heads = config.num_query_groups  # whole layer
        self.local_kv_heads = self.num_kv_heads // tp_size
        self.kv_offset = tp_rank * self.local_kv_heads
        self.queries_per_group = config.num_attention_heads // config.num_query_groups
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.te: Optional[TEKernels] = None
        """The ``te`` backend's kernels (full and sliding-window units through Transformer Engine); None:
        this project's kernels. Sink + recent units (LoZA) always use this project's."""
        if backend == "te":
            if self.cp is not None:
                raise ValueError(
                    "hybrid attention with model.backend='te' has no context parallelism: set "
                    "model.backend: local for parallel.context > 1"
                )
            self.te = TEKernels(self.head_dim, self.softmax_scale, layer_number)
        elif backend != "local":
            raise ValueError(f"backend {backend!r} is not 'local' or 'te'")
        self.fused = True
        """Whether a gated or static mixed layer on the CPU (float32, no CP, no TE, no sinks) runs its
        heads in one pass of the fused kernel (:mod:`~megatron_ext.models.fused_swa`); False: each kernel
        on its own heads (full attention through SDPA), the reference the tests compare it with."""
        self.mode = "full"
        self._gate: Optional[Callable[[bool], torch.Tensor]] = None
        self._full_heads: Optional[torch.Tensor] = None  # [local_kv_heads] bool, static mode

    # -- configuration by the ConSA callback -------------------------------------------------------
    def set_full(self) -> None:
        self.mode, self._gate, self._full_heads = "full", None, None

    def set_gated(self, gate: Callable[[bool], torch.Tensor]) -> None:
        """``gate(training)`` -> this layer's z: [1] (layer unit) or [num_kv_heads] (whole layer)."""
        self.mode, self._gate, self._full_heads = "gated", gate, None

    def set_static(self, full_attention: Sequence[bool]) -> None:
        """``full_attention``: one flag per KV head of the whole layer (or one for the layer)."""
        flags = torch.as_tensor(list(full_attention), dtype=torch.bool)
        if flags.numel() == 1:
            flags = flags.expand(self.num_kv_heads)
        if flags.numel() != self.num_kv_heads:
            raise ValueError(
                f"layer {self.layer_index}: allocation has {flags.numel()} KV-head flags, the "
                f"layer has {self.num_kv_heads} KV heads"
            )
        self.mode, self._gate = "static", None
        self._full_heads = flags[self.kv_offset : self.kv_offset + self.local_kv_heads].clone()

    def attended_keys(self) -> List[KeyPlan]:
        """:meth:`KeyPlanAttention.attended_keys`: a unit in mask learning mixes both kernels, reported as full."""
        if self.mode != "static":
            return [(None, 0)] * self.local_kv_heads
        return [(None, 0) if full else (self.window, self.sink) for full in self._full_heads.tolist()]

    def kv_cache_plan(self) -> List[KeyPlan]:
        """:meth:`KeyPlanAttention.kv_cache_plan`: a layer in mask learning cannot be cached."""
        if self.mode == "gated":
            raise ValueError(
                f"layer {self.layer_index} is in mask learning (gated full + sliding attention): "
                "decode a checkpoint saved after binarization, or one of the dense warm-up"
            )
        return self.attended_keys()

    def attention_pairs(self, seq_length: int) -> List[int]:
        """:meth:`AttentionPairCounter.attention_pairs`: ``T^2`` for full attention (the full square, as
        FlopCounterMode counts SDPA), the blocked window kernel's for a sliding window (what it really
        computes); in mask learning, where both run, the full square plus the window's."""
        from megatron_ext.models.kernels import window_kernel_pairs

        full = seq_length * seq_length
        if self.mode == "full":
            return [full] * self.local_kv_heads
        sparse = window_kernel_pairs(seq_length, self.window) if not self.sink else full
        if self.mode == "gated":
            return [full + sparse] * self.local_kv_heads
        return [full if flag else sparse for flag in self._full_heads.tolist()]

    # -- compute -----------------------------------------------------------------------------------
    def forward(
        self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("hybrid attention supports neither packed sequences nor attention bias")
        return self.forward_heads(query, key, value, list(range(self.local_kv_heads)), attention_mask)

    def forward_heads(self, query, key, value, local_kv_heads: Sequence[int], attention_mask=None):
        """:meth:`HeadSubsetAttention.forward_heads`, each KV head with its allocation."""
        s, b, nq, hn = query.shape
        heads = torch.as_tensor(list(local_kv_heads), dtype=torch.long)
        q, k, v = query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
        out = self._attend(q, k, v, heads, self.queries_per_group, document_starts_of(attention_mask))
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * hn)

    def forward_query_heads(
        self, query, key, value, kv_of_query: Sequence[int], local_kv_heads: Sequence[int], attention_mask=None
    ):
        """:meth:`QueryHeadSubsetAttention.forward_query_heads`, each KV head with its allocation."""
        s, b, nq, hn = query.shape
        index = torch.as_tensor(list(kv_of_query), dtype=torch.long, device=key.device)
        k = key.index_select(2, index).permute(1, 2, 0, 3)  # [b, nq, s, hn]: each query head's KV head
        v = value.index_select(2, index).permute(1, 2, 0, 3)
        heads = torch.as_tensor([local_kv_heads[i] for i in kv_of_query], dtype=torch.long)
        out = self._attend(query.permute(1, 2, 0, 3), k, v, heads, 1, document_starts_of(attention_mask))
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * hn)

    def _attend(self, q, k, v, heads, qpg: int, docs=None):
        """``q [b, nq, s, hn]`` over ``k`` / ``v [b, len(heads), s, hn]`` (``qpg`` query heads per
        KV head), ``heads`` the local KV head of each position in ``k``; ``docs``: document starts."""
        if docs is not None and self.te is not None:
            raise ValueError(
                "hybrid attention with model.backend='te' takes no document mask "
                "(data.reset_attention_mask): set model.backend: local"
            )
        if self.mode == "full":
            return self._full(q, k, v, docs)
        if self.mode == "gated":
            return self._gated(q, k, v, heads, qpg, docs)
        return self._static(q, k, v, self._full_heads[heads], qpg, docs)

    def _gated(self, q, k, v, heads, qpg: int, docs=None):
        # The gates live on the CPU (replicated, see ConSACallback); their gradient flows back through .to().
        with torch.profiler.record_function("consa/gates"):  # a named region of profiler traces
            z = self._gate(self.training)  # [1] or [num_kv_heads]
        if z.numel() > 1:
            z = z[self.kv_offset + heads].repeat_interleave(qpg)  # [nq]
        z = z.to(device=q.device, dtype=q.dtype)
        z = z.view(1, -1, 1, 1)
        if self._one_pass(q):  # both outputs from one computation of the scores
            full, swa = fused_swa.fused_full_and_window_attention(
                q, k, v, self.window, self.softmax_scale, DEFAULT_BLOCK_SIZE, docs
            )
        else:
            full = self._full(q, k, v, docs)
            swa = self._sparse(q, k, v, docs)
        return torch.lerp(swa, full, z)  # z * full + (1 - z) * swa in one pass (and one in backward)

    def _one_pass(self, q: torch.Tensor) -> bool:
        """Whether a gated or mixed layer runs in one pass of the fused CPU kernel (see ``fused``)."""
        return self.fused and self.cp is None and self.te is None and not self.sink and fused_swa.runs(q)

    def _full(self, q, k, v, docs=None):
        """The full units' causal attention (over every CP rank's keys under CP)."""
        if self.cp is not None:
            return context_parallel_attention(q, k, v, self.cp, self.softmax_scale, doc_start=docs)
        if self.te is not None:
            return self.te(q, k, v)
        return causal_attention(q, k, v, self.softmax_scale, docs)

    def _sparse(self, q, k, v, docs=None):
        """The sparse units' attention: sliding window (with the halo under CP), or sink + recent (``sink > 0``)."""
        if self.cp is not None:
            return context_parallel_attention(
                q, k, v, self.cp, self.softmax_scale, window=self.window, sink=self.sink, doc_start=docs
            )
        if self.sink:
            return sink_window_attention(q, k, v, self.window, self.sink, self.softmax_scale, docs)
        if self.te is not None:
            return self.te(q, k, v, self.window)
        return sliding_window_attention(q, k, v, self.window, self.softmax_scale, docs)

    def _static(self, q, k, v, full_flags, qpg: int, docs=None):
        if bool(full_flags.all()):
            return self._full(q, k, v, docs)
        if not bool(full_flags.any()):
            return self._sparse(q, k, v, docs)
        if self._one_pass(q):  # each KV head with its own window, threads balanced by cost
            windows = [fused_swa.FULL if full else self.window for full in full_flags.tolist()]
            return fused_swa.fused_sliding_window_attention(
                q, k, v, windows, self.softmax_scale, DEFAULT_BLOCK_SIZE, docs
            )
        # Mixed layer: two groups, each through its own kernel.
        fa_kv = full_flags.nonzero().flatten()
        swa_kv = (~full_flags).nonzero().flatten()

        def query_heads(kv):  # query heads of the given KV heads, in order
            return (kv.unsqueeze(1) * qpg + torch.arange(qpg, device=kv.device)).flatten()

        fa_kv, swa_kv = fa_kv.to(q.device), swa_kv.to(q.device)
        fa_q, swa_q = query_heads(fa_kv), query_heads(swa_kv)
        q_fa, q_swa = _SplitHeads.apply(q, fa_q, swa_q)
        k_fa, k_swa = _SplitHeads.apply(k, fa_kv, swa_kv)
        v_fa, v_swa = _SplitHeads.apply(v, fa_kv, swa_kv)
        full, sparse = self._full(q_fa, k_fa, v_fa, docs), self._sparse(q_swa, k_swa, v_swa, docs)
        return _MergeHeads.apply(full, sparse, fa_q, swa_q)

    def extra_repr(self) -> str:
        backend = "te" if self.te is not None else "local"
        return f"layer={self.layer_index}, mode={self.mode}, window={self.window}, sink={self.sink}, backend={backend}"


# A static mixed layer runs its FA heads and its SWA heads as two groups. Both moves below copy whole heads
# once, forward and backward (advanced indexing would scatter with the slow accumulating index_put in
# backward, and gathering each group separately would add a zero-filled gradient per group).


def _copy_heads(dst: torch.Tensor, heads: List[int], src: torch.Tensor) -> None:
    """``dst[:, heads[j]] = src[:, j]``: one strided copy per head, about twice as fast on CPU as
    ``index_copy_`` into the ``[s, b, h, d]`` layout (whose head rows are strided)."""
    for j, head in enumerate(heads):
        dst[:, head].copy_(src[:, j])


def _select_heads(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]`` for ``x [b, h, s, d]``, gathered in ``x``'s memory order: a ``[s, b, h, d]`` tensor
    seen as ``[b, h, s, d]`` (the core attention's inputs) copies runs of whole head rows, about 4x faster
    than gathering along the strided head dimension; the result keeps that layout."""
    sbhd = x.permute(2, 0, 1, 3)
    if sbhd.is_contiguous():
        return sbhd.index_select(2, index).permute(1, 2, 0, 3)
    return x.index_select(1, index)


class _SplitHeads(torch.autograd.Function):
    """``x [b, h, s, d]`` -> ``(x[:, first], x[:, second])`` for index tensors that partition the heads;
    the gradient is assembled in ``x``'s own layout, so the caller's permutes stay views."""

    @staticmethod
    def forward(ctx, x, first, second):
        ctx.save_for_backward(first, second)
        ctx.like = torch.empty_like(x, device="meta")  # x's shape and layout, no memory
        return _select_heads(x, first), _select_heads(x, second)

    @staticmethod
    def backward(ctx, grad_first, grad_second):
        first, second = ctx.saved_tensors
        like = ctx.like
        grad_any = grad_first if grad_first is not None else grad_second
        grad = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=grad_any.device)
        for index, part in ((first, grad_first), (second, grad_second)):
            if part is None:
                grad.index_fill_(1, index, 0.0)
            else:
                _copy_heads(grad, index.tolist(), part)
        return grad, None, None


class _MergeHeads(torch.autograd.Function):
    """The inverse of :class:`_SplitHeads`: ``out[:, first] = a``, ``out[:, second] = b``, ``out`` laid out
    as ``[s, b, h, d]`` seen as ``[b, h, s, d]`` (what the core attention returns, flattened)."""

    @staticmethod
    def forward(ctx, a, b, first, second):
        ctx.save_for_backward(first, second)
        batch, _, seq, dim = a.shape
        out = a.new_empty(seq, batch, first.numel() + second.numel(), dim).permute(1, 2, 0, 3)
        _copy_heads(out, first.tolist(), a)
        _copy_heads(out, second.tolist(), b)
        return out

    @staticmethod
    def backward(ctx, grad):
        first, second = ctx.saved_tensors
        return _select_heads(grad, first), _select_heads(grad, second), None, None
