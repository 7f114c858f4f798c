"""A Megatron ``TransformerLayer`` that can loop its attention sublayer (SGT) or its whole block.

SGT (Sparse Growing Transformer, arXiv 2603.23998) loops a selected layer's attention, after
``x = x + Attn(norm(x))`` and before the MLP, ``loop_depth`` times with the same parameters [code]:

    h <- h + W_O · merge_heads(f ⊙ softmax(Q K^T / sqrt(d) + causal) V),   Q, K, V from norm(h)

``f`` holds one factor per query head: 1 for the kept heads, fading linearly to 0 for the others
(:meth:`GrowthScheduler.head_factors`). The MLP runs once, after the loops [code].

Two implementations of one loop pass, kept side by side:

* reference (:meth:`LoopedTransformerLayer._loop_all_heads`): the layer's own ``linear_qkv``,
  norms, RoPE and ``linear_proj``; every head is computed and scaled by its factor before the
  output projection. Used while some factor lies strictly between 0 and 1 (the fade).
* kept heads (:meth:`LoopedTransformerLayer._loop_kept_heads`) [choice]: once every factor is 0 or 1, only
  the rows of the QKV weight that belong to the kept query heads and their KV groups, and the
  matching columns of the output weight, are multiplied, and attention runs for the kept query
  heads only (a hybrid core attention through its
  :meth:`~megatron_ext.models.protocols.QueryHeadSubsetAttention.forward_query_heads`, which applies
  each head's allocation). The loop then costs the kept heads'
  share of the attention sublayer (the 1-3 % overhead of the paper). The tensor-parallel
  communication of ``linear_qkv`` / ``linear_proj`` is reproduced around the sliced matmuls, so a
  rank that holds no kept head contributes zeros and still joins every collective.

The loop's attention is the core attention module's where it implements
:class:`~megatron_ext.models.protocols.HeadSubsetAttention` (whole KV groups) or
:class:`~megatron_ext.models.protocols.QueryHeadSubsetAttention` (any query heads), so that a hybrid
full / sliding-window module applies its own per-head allocation inside the loop too. Without them
the loop uses causal ``scaled_dot_product_attention``.

The ``block`` baseline instead re-runs the whole layer (attention and MLP) ``loop_depth`` times.

Under context parallelism the loop passes run the core attention's CP form, and the entropy takes
the last query from the CP rank that holds it and combines every rank's log-sum-exp statistics over
its own keys (:meth:`_entropy`): a few numbers per head cross the group, not the keys.

Entropy (for the growth schedule) is measured on the layer's ordinary attention pass by a forward
pre-hook on ``self_attention.core_attention``: whatever the kernel, its inputs are the post-RoPE
query ``[s, b, np, hn]`` and key ``[s, b, ng, hn]``, from which
:func:`~megatron_ext.sgt.entropy.seen_keys_entropy` takes the last query's row in ``O(T d)``: over
the keys each head really attends to, i.e. the last ``W`` (and sink) keys for a sliding-window head
of a hybrid layer (:class:`~megatron_ext.models.protocols.KeyPlanAttention`), normalised by ln of their number
[choice]. The last loop pass of a looped layer is measured too, on the heads it computes: the
callback feeds a selected layer's kept heads that entropy and its other heads the ordinary pass's,
as the reference code (``finalize_entropy``) [code]. Both go to the sink once per training
forward. The block baseline observes the ordinary pass only. Measuring is off in eval mode. Under
activation recomputation a recomputed forward is observed again with the same values, which leaves
the step's mean unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor

from megatron_ext.compat.layers import forward_attention, forward_mlp
from megatron_ext.models.context_attention import context_parallel_attention
from megatron_ext.models.documents import document_starts_of, visible_keys
from megatron_ext.models.protocols import (
    AttentionPairCounter,
    DecodePass,
    DecodePassesLayer,
    HeadSubsetAttention,
    KeptHeadsLayer,
    KeyPlanAttention,
    QueryHeadSubsetAttention,
)
from megatron_ext.models.rope import rotate_query_key
from megatron_ext.parallel.context import context_parallel_of
from megatron_ext.sgt.entropy import seen_keys_entropy, seen_keys_entropy_context_parallel

__all__ = ["EntropySink", "LoopedTransformerLayer", "looped_layer_spec"]

EntropySink = Callable[[Tensor, Optional[Tensor]], None]
"""Receives one micro-batch's ``[local query heads]`` entropy (mean over the batch) of a layer's
ordinary attention pass and of its last loop pass (None when it did not loop; NaN for heads the
pass did not compute)."""

LOOP_METHODS = ("sgt", "block")


class LoopedTransformerLayer(TransformerLayer, DecodePassesLayer, KeptHeadsLayer, AttentionPairCounter):
    """Megatron's pre-norm decoder layer plus SGT attention loops or the block-loop baseline, with the
    layer protocols of :mod:`megatron_ext.models.protocols`.

    Same constructor as :class:`TransformerLayer`. Runtime state, set between steps (by
    :class:`~megatron_ext.sgt.callback.SGTCallback`):

    * ``loop_depth``: extra passes, 0 = the vanilla layer (:meth:`set_loop`);
    * ``loop_method``: ``"sgt"`` (attention sublayer) or ``"block"`` (whole layer);
    * ``head_factors``: one factor per query head of the whole layer (all TP ranks), used by
      ``sgt`` (:meth:`set_head_factors`); [choice] a head with factor 0 is not computed at all;
    * entropy tracking: on while a sink is installed (:meth:`set_entropy_sink`).

    ``use_kept_heads_path`` (default True) selects the kept-heads implementation whenever the
    factors allow it; False forces the all-heads reference (for tests and debugging).
    """

    def __init__(
        self,
        config,
        submodules,
        layer_number: int = 1,
        hidden_dropout: Optional[float] = None,
        pg_collection=None,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(
            config,
            submodules,
            layer_number=layer_number,
            hidden_dropout=hidden_dropout,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        attn = self.self_attention
        self._check_supported(config, attn)
        self.layer_index = self.layer_number - 1
        """Global (whole-model) index of this layer, 0-based."""
        self.num_heads = config.num_attention_heads
        self._tp_group = attn.pg_collection.tp
        self._head_dim = attn.hidden_size_per_attention_head
        self._local_heads = attn.num_attention_heads_per_partition
        self._local_groups = attn.num_query_groups_per_partition
        self._heads_per_group = self._local_heads // self._local_groups
        self._head_offset = get_pg_rank(self._tp_group) * self._local_heads
        self._cp = context_parallel_of(attn.pg_collection)
        self._softmax_scale = (
            config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(self._head_dim)
        )
        self.loop_depth = 0
        self.loop_method = "sgt"
        self.head_factors: List[float] = [1.0] * self.num_heads
        self.use_kept_heads_path = True
        self._entropy_sink: Optional[EntropySink] = None
        self._entropy_hook = None
        self._entropy_paused = False
        self._first_entropy: Optional[Tensor] = None
        self._loop_entropy: Optional[Tensor] = None

    @staticmethod
    def _check_supported(config, attn) -> None:
        problems = []
        if config.num_query_groups < get_pg_size(attn.pg_collection.tp):
            problems.append(
                f"num_query_groups={config.num_query_groups} below the tensor-parallel size "
                f"{get_pg_size(attn.pg_collection.tp)} (KV heads replicated across ranks)"
            )
        if config.attention_output_gate:
            problems.append("attention_output_gate")
        if config.gradient_accumulation_fusion:
            problems.append(
                "gradient_accumulation_fusion (the kept-heads loop multiplies weight slices "
                "with plain autograd, whose gradients fused accumulation would skip)"
            )
        if getattr(attn, "attn_mask_type", None) != AttnMaskType.causal:
            problems.append("a self-attention that is not causal")
        if hasattr(attn.linear_qkv, "layer_norm_weight"):
            problems.append(
                "a QKV projection with a fused input norm (use the local layer spec, whose "
                "input norm is a module of its own)"
            )
        if problems:
            raise ValueError("LoopedTransformerLayer does not support " + "; ".join(problems) + ".")

    # -- runtime state -----------------------------------------------------------------------

    def set_loop(self, depth: int, method: str = "sgt") -> None:
        """Loop ``depth`` extra times (0: vanilla) with ``method`` ``"sgt"`` or ``"block"``."""
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"loop depth {depth!r} is not allowed: use an int >= 0")
        if method not in LOOP_METHODS:
            raise ValueError(f"loop method {method!r} is not allowed: use one of {LOOP_METHODS}")
        self.loop_depth = depth
        self.loop_method = method

    def set_head_factors(self, factors: Sequence[float]) -> None:
        """Per-query-head factors of the loop output, one per head of the whole layer, in [0, 1]."""
        factors = [float(f) for f in factors]
        if len(factors) != self.num_heads or not all(0.0 <= f <= 1.0 for f in factors):
            raise ValueError(
                f"layer {self.layer_index}: expected {self.num_heads} head factors in [0, 1], got {factors}"
            )
        self.head_factors = factors

    def set_entropy_sink(self, sink: Optional[EntropySink]) -> None:
        """Measure the last query's attention entropy of every training forward and hand the
        ``[local query heads]`` vector to ``sink``; None removes the hook (no cost left)."""
        if self._entropy_hook is not None:
            self._entropy_hook.remove()
            self._entropy_hook = None
        self._entropy_sink = sink
        if sink is not None:
            self._entropy_hook = self.self_attention.core_attention.register_forward_pre_hook(
                self._observe_entropy, with_kwargs=True
            )

    def decode_passes(self) -> List[DecodePass]:
        """:meth:`DecodePassesLayer.decode_passes`: the loop passes after the ordinary attention pass (SGT)
        or the whole layer again (block)."""
        if self.loop_depth == 0:
            return [("attention", None), ("mlp", None)]
        if self.loop_method == "block":
            return [("attention", None), ("mlp", None)] * (self.loop_depth + 1)
        return [("attention", None)] + [("attention", list(self.head_factors))] * self.loop_depth + [("mlp", None)]

    def attention_pairs(self, seq_length: int) -> List[int]:
        """:meth:`AttentionPairCounter.attention_pairs` of one ordinary pass: the core attention's, or
        the full ``T^2`` square for a core attention that does not count them."""
        core = self.self_attention.core_attention
        if isinstance(core, AttentionPairCounter):
            return core.attention_pairs(seq_length)
        return [seq_length * seq_length] * self._local_groups

    @property
    def local_head_range(self) -> range:
        """Global indices of the query heads this tensor-parallel rank computes."""
        return range(self._head_offset, self._head_offset + self._local_heads)

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        rotary_pos_emb=None,
        **kwargs,
    ):
        """Megatron's layer forward; with ``loop_depth > 0`` it loops as described above."""
        kwargs.pop("dynamic_inference_decode_only", None)
        common = dict(
            attention_mask=attention_mask,
            context=context,
            context_mask=context_mask,
            rotary_pos_emb=rotary_pos_emb,
            **kwargs,
        )
        if self.loop_depth == 0:
            out = super().forward(hidden_states, **common)
        elif self.loop_method == "block":
            out = self._forward_block_loop(hidden_states, common)
        else:
            self._check_loop_inputs(kwargs)
            hidden_states, context = forward_attention(self, hidden_states, **common)
            for index in range(self.loop_depth):
                last = index == self.loop_depth - 1
                hidden_states = self.loop_attention(
                    hidden_states, rotary_pos_emb, observe=last and self._observing(), attention_mask=attention_mask
                )
            output = forward_mlp(
                self, hidden_states, kwargs.get("inference_context"), padding_mask=kwargs.get("padding_mask")
            )
            out = (output, context)
        self._emit_entropy()
        return out

    def _forward_block_loop(self, hidden_states: Tensor, common: dict):
        output, context = super().forward(hidden_states, **common)
        self._entropy_paused = True  # observe the ordinary pass only
        try:
            for _ in range(self.loop_depth):
                output, context = super().forward(output, **common)
        finally:
            self._entropy_paused = False
        return output, context

    def _check_loop_inputs(self, kwargs: dict) -> None:
        unsupported = [
            name
            for name in (
                "inference_context",
                "packed_seq_params",
                "attention_bias",
                "rotary_pos_cos",
                "rotary_pos_sin",
                "rotary_pos_cos_sin",
            )
            if kwargs.get(name) is not None
        ]
        if unsupported:
            raise ValueError(
                f"layer {self.layer_index}: the SGT attention loop is causal self-attention "
                f"over whole sequences for training; it does not take {unsupported}"
            )

    def loop_attention(
        self, hidden_states: Tensor, rotary_pos_emb=None, observe: bool = False, attention_mask=None
    ) -> Tensor:
        """One loop pass ``h + W_O · merge_heads(f ⊙ heads(norm(h)))``; ``[s, b, h]`` in and out.
        ``observe``: measure the pass's last-query entropy of the heads it computes (the last pass
        of a training forward while entropy is tracked). ``attention_mask``: the layer's (None, or
        document starts: the loop attends within documents as the ordinary pass does)."""
        active = [head for head, factor in enumerate(self.head_factors) if factor > 0.0]
        if self.use_kept_heads_path and all(self.head_factors[head] == 1.0 for head in active):
            return self._loop_kept_heads(hidden_states, rotary_pos_emb, active, observe, attention_mask)
        return self._loop_all_heads(hidden_states, rotary_pos_emb, observe, attention_mask)

    def _loop_all_heads(
        self, hidden_states: Tensor, rotary_pos_emb, observe: bool = False, attention_mask=None
    ) -> Tensor:
        """Reference: every local head through the layer's own modules, scaled by its factor."""
        attn = self.self_attention
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        # [s, b, np, hn], [s, b, ng, hn], [s, b, ng, hn] (sequence-parallel gather inside)
        query, key, value = attn.get_query_key_value_tensors(normed)
        query, key = self._rotate(query, key, rotary_pos_emb)
        kv_of_query = [head // self._heads_per_group for head in range(self._local_heads)]
        groups = list(range(self._local_groups))
        if observe:
            self._loop_entropy = self._entropy(query, key, kv_of_query, groups, attention_mask)
        core = attn.core_attention
        if isinstance(core, HeadSubsetAttention):  # every head of every group: the module's own layout
            context = core.forward_heads(query, key, value, groups, **_mask_kwargs(attention_mask))
            context = context.unflatten(-1, (-1, self._head_dim))
        else:
            context = self.attend_heads(query, key, value, kv_of_query, groups, attention_mask)
        factors = torch.tensor(
            [self.head_factors[head] for head in self.local_head_range], dtype=context.dtype, device=context.device
        )
        context = context * factors.view(1, 1, -1, 1)  # [s, b, np, hn]
        output, bias = attn.linear_proj(context.flatten(2))
        return self._add_residual(output, bias, residual)

    def _loop_kept_heads(
        self,
        hidden_states: Tensor,
        rotary_pos_emb,
        kept_heads: Sequence[int],
        observe: bool = False,
        attention_mask=None,
    ) -> Tensor:
        """Only the kept heads: sliced QKV rows and output columns, Megatron's TP communication."""
        attn = self.self_attention
        hn, per_group = self._head_dim, self._heads_per_group
        local = [head - self._head_offset for head in kept_heads if head in self.local_head_range]
        groups = sorted({head // per_group for head in local})
        core = attn.core_attention
        if isinstance(core, HeadSubsetAttention) and not isinstance(core, QueryHeadSubsetAttention):
            # forward_heads takes whole KV groups: compute their other heads too, drop them below.
            computed = [group * per_group + i for group in groups for i in range(per_group)]
        else:
            computed = local
        residual = hidden_states
        normed = self._enter_tensor_parallel_region(self.input_layernorm(hidden_states))  # [s, b, h]
        query, key, value = self.kept_heads_qkv(normed, computed, groups)
        num_q, num_kv = len(computed), len(groups)
        query = query.unflatten(-1, (num_q, hn))  # [s, b, nq, hn]
        if num_q == 0:
            # No kept head on this rank: an empty context still links this rank's reductions below
            # into the autograd graph, so that it joins their backward collectives as well.
            context = query
            if observe:
                self._loop_entropy = None
        else:
            key = key.unflatten(-1, (num_kv, hn))  # [s, b, nkv, hn]
            value = value.unflatten(-1, (num_kv, hn))
            if attn.q_layernorm is not None:
                query = attn.q_layernorm(query)
            if attn.k_layernorm is not None:
                key = attn.k_layernorm(key)
            query, key = self._rotate(query, key, rotary_pos_emb)
            kv_of_query = [groups.index(head // per_group) for head in computed]
            if observe:
                entropy = self._entropy(query, key, kv_of_query, groups, attention_mask)
                self._loop_entropy = torch.full(
                    (self._local_heads,), float("nan"), dtype=entropy.dtype, device=entropy.device
                )
                self._loop_entropy[computed] = entropy
            context = self.attend_heads(query, key, value, kv_of_query, groups, attention_mask)
            if computed != local:
                context = context[:, :, [computed.index(head) for head in local]]
        partial = self.kept_heads_proj(context.flatten(2), local)
        output = self._leave_tensor_parallel_region(partial)  # [s(/tp), b, h], summed over ranks
        return self._add_residual(output, attn.linear_proj.bias, residual)

    def kept_heads_qkv(
        self, normed: Tensor, query_heads: Sequence[int], groups: Sequence[int]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`KeptHeadsLayer.kept_heads_qkv`."""
        attn, hn = self.self_attention, self._head_dim
        rows = self._slice_of("qkv", tuple(query_heads), tuple(groups), normed.device)
        bias = attn.linear_qkv.bias
        qkv = F.linear(normed, _take(attn.linear_qkv.weight, 0, rows), None if bias is None else _take(bias, 0, rows))
        return qkv.split([len(query_heads) * hn, len(groups) * hn, len(groups) * hn], dim=-1)

    def kept_heads_proj(self, context: Tensor, query_heads: Sequence[int]) -> Tensor:
        """:meth:`KeptHeadsLayer.kept_heads_proj`."""
        columns = self._slice_of("proj", tuple(query_heads), (), context.device)
        return F.linear(context, _take(self.self_attention.linear_proj.weight, 1, columns))

    def _slice_of(self, which: str, heads: tuple, groups: tuple, device):
        """The QKV rows (``qkv``) or output-projection columns (``proj``) of a kept set, built once
        per (layer, kept set): a ``slice`` where they are contiguous (a view of the weight, whose
        gradient is a view too), else an index tensor."""
        key = (which, heads, groups, str(device))
        cache = self.__dict__.setdefault("_slices", {})
        if key not in cache:
            hn = self._head_dim
            index = (
                self._qkv_rows(heads, groups, device)
                if which == "qkv"
                else torch.tensor([h * hn + i for h in heads for i in range(hn)], dtype=torch.long, device=device)
            )
            values = index.tolist()
            contiguous = bool(values) and values == list(range(values[0], values[0] + len(values)))
            cache[key] = slice(values[0], values[0] + len(values)) if contiguous else index
        return cache[key]

    def _qkv_rows(self, query_heads: Sequence[int], groups: Sequence[int], device) -> Tensor:
        """Rows of the local fused QKV weight: the query heads', then the groups' keys and values.

        The local weight is ``[ng * (np/ng + 2) * hn, h]``, per group: its query heads, key, value.
        """
        hn, per_group = self._head_dim, self._heads_per_group
        stride = (per_group + 2) * hn

        def block(start: int) -> List[int]:
            return list(range(start, start + hn))

        rows = [r for head in query_heads for r in block((head // per_group) * stride + (head % per_group) * hn)]
        rows += [r for group in groups for r in block(group * stride + per_group * hn)]
        rows += [r for group in groups for r in block(group * stride + (per_group + 1) * hn)]
        return torch.tensor(rows, dtype=torch.long, device=device)

    def _enter_tensor_parallel_region(self, normed: Tensor) -> Tensor:
        """What ColumnParallelLinear does to its input: gather the sequence (SP), or a copy whose
        backward all-reduces the input gradient over the TP group."""
        if self.config.sequence_parallel:
            return gather_from_sequence_parallel_region(normed, group=self._tp_group)
        return copy_to_tensor_model_parallel_region(normed, group=self._tp_group)

    def _leave_tensor_parallel_region(self, partial: Tensor) -> Tensor:
        """What RowParallelLinear does to its output: reduce-scatter (SP) or all-reduce over TP."""
        if self.config.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, group=self._tp_group)
        return reduce_from_tensor_model_parallel_region(partial, group=self._tp_group)

    def _rotate(self, query: Tensor, key: Tensor, rotary_pos_emb):
        """RoPE as Megatron's attention applies it (none for layers listed in ``no_rope_freq``)."""
        return rotate_query_key(self.self_attention, self.layer_number, query, key, rotary_pos_emb)

    def attend_heads(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        kv_of_query: Sequence[int],
        local_kv_heads: Sequence[int],
        attention_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """:meth:`KeptHeadsLayer.attend_heads`: a core attention with :class:`QueryHeadSubsetAttention`
        (hybrid attention) computes exactly these query heads with its own per-head kernels; one with
        :class:`HeadSubsetAttention` only is handed whole KV groups; otherwise causal SDPA."""
        core = self.self_attention.core_attention
        if isinstance(core, QueryHeadSubsetAttention):
            mask = _mask_kwargs(attention_mask)
            out = core.forward_query_heads(query, key, value, list(kv_of_query), list(local_kv_heads), **mask)
            return out.unflatten(-1, (-1, self._head_dim))
        if isinstance(core, HeadSubsetAttention):  # query holds whole KV groups, in order
            out = core.forward_heads(query, key, value, list(local_kv_heads), **_mask_kwargs(attention_mask))
            return out.unflatten(-1, (-1, self._head_dim))
        doc_start = document_starts_of(attention_mask)
        index = torch.tensor(list(kv_of_query), dtype=torch.long, device=key.device)
        q = query.permute(1, 2, 0, 3)  # [b, nq, s, hn]
        k = key.index_select(2, index).permute(1, 2, 0, 3)  # [b, nq, s, hn]: each query head's KV head
        v = value.index_select(2, index).permute(1, 2, 0, 3)
        if self._cp is not None:  # no attention dropout under CP (refused by the config checks)
            out = context_parallel_attention(q, k, v, self._cp, self._softmax_scale, doc_start=doc_start)
            return out.permute(2, 0, 1, 3)
        dropout = self.config.attention_dropout if self.training else 0.0
        s = q.shape[2]
        mask = None if doc_start is None else visible_keys(s, s, doc_start, None, 0, q.device)
        sdpa = dict(attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=self._softmax_scale)
        if dropout > 0.0 and not self.config.sequence_parallel:
            # Heads differ across TP ranks: draw their dropout from the per-rank stream, as Megatron.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, **sdpa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **sdpa)
        return out.permute(2, 0, 1, 3)  # [s, b, nq, hn]

    def _add_residual(self, output: Tensor, bias: Optional[Tensor], residual: Tensor) -> Tensor:
        """``residual + dropout(output + bias)``, with the layer's own bias-dropout-add."""
        with self.bias_dropout_add_exec_handler():
            return self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                (output, bias), residual, self.hidden_dropout
            )

    # -- entropy -----------------------------------------------------------------------------

    def _observing(self) -> bool:
        return self._entropy_sink is not None and self.training and not self._entropy_paused

    def _key_plans(self, local_kv_heads: Sequence[int]):
        """What each listed local KV head's queries see (:meth:`KeyPlanAttention.attended_keys` of the
        core; every earlier key for a core attention without it)."""
        core = self.self_attention.core_attention
        plans = core.attended_keys() if isinstance(core, KeyPlanAttention) else [(None, 0)] * self._local_groups
        return [plans[g] for g in local_kv_heads]

    def _entropy(
        self,
        query: Tensor,
        key: Tensor,
        kv_of_query: Sequence[int],
        local_kv_heads: Sequence[int],
        attention_mask: Optional[Tensor] = None,
    ):
        """``[len(kv_of_query)]`` last-query entropy (mean over the batch) of ``query [s, b, nq, hn]``
        over ``key [s, b, nkv, hn]``, each head over the keys it attends to (within the last query's
        document under document masking). Under CP the last query lives on CP rank 0 and the keys on
        every rank: each rank takes the broadcast query, reduces its own keys to log-sum-exp statistics
        and combines every rank's, so all compute the same entropy."""
        plans = self._key_plans(local_kv_heads)
        doc_start = document_starts_of(attention_mask)
        first_key = None if doc_start is None else doc_start[:, -1]  # the last query's document start
        if self._cp is None:
            k = key.permute(1, 2, 0, 3)
            entropy = seen_keys_entropy(query[-1], k, self._softmax_scale, kv_of_query, plans, first_key)
        else:
            q_last = self._cp.last_position(query, 0)  # [b, nq, hn]
            local = key.shape[0]
            entropy = seen_keys_entropy_context_parallel(
                q_last,
                key.permute(1, 2, 0, 3),
                self._cp.positions(local, key.device),
                local * self._cp.size,
                self._softmax_scale,
                kv_of_query,
                plans,
                self._cp,
                first_key,
            )  # [b, nq]
        return entropy.mean(dim=0)

    def _observe_entropy(self, module, args, kwargs) -> None:
        """Forward pre-hook of the core attention: the ordinary pass's last-query entropy per local head."""
        if not self._observing():
            return None
        query = args[0] if len(args) > 0 else kwargs["query"]  # [s, b, np, hn], after RoPE
        key = args[1] if len(args) > 1 else kwargs["key"]  # [s, b, ng, hn]
        if query.dim() != 4 or key.dim() != 4:
            raise ValueError(
                f"layer {self.layer_index}: entropy tracking needs [s, b, heads, dim] query and "
                f"key; got {tuple(query.shape)} and {tuple(key.shape)} (packed sequences?)"
            )
        attention_mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
        per_group = query.size(2) // key.size(2)
        self._first_entropy = self._entropy(
            query, key, [h // per_group for h in range(query.size(2))], list(range(key.size(2))), attention_mask
        )
        self._loop_entropy = None
        return None

    def _emit_entropy(self) -> None:
        """After a training forward: hand ``(ordinary pass, last loop pass or None)`` to the sink."""
        first, last = getattr(self, "_first_entropy", None), getattr(self, "_loop_entropy", None)
        self._first_entropy = self._loop_entropy = None
        if first is not None and self._entropy_sink is not None:
            self._entropy_sink(first, last)


def _mask_kwargs(attention_mask: Optional[Tensor]) -> dict:
    """The ``attention_mask`` keyword of a head-subset call: only when there is one, so that a core
    attention written before document masking (no such parameter) still serves unmasked layers."""
    return {} if attention_mask is None else {"attention_mask": attention_mask}


def _take(tensor: Tensor, dim: int, index) -> Tensor:
    """``tensor``'s rows (dim 0) or columns (dim 1) at ``index``: a view for a slice."""
    if isinstance(index, slice):
        return tensor.narrow(dim, index.start, index.stop - index.start)
    return tensor.index_select(dim, index)


def looped_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """A copy of a ``TransformerLayer`` spec that builds :class:`LoopedTransformerLayer` instead."""
    if spec.module not in (TransformerLayer, LoopedTransformerLayer):
        raise ValueError(
            f"looped_layer_spec needs a spec of Megatron's TransformerLayer; got {spec.module!r}, "
            "whose own behaviour a LoopedTransformerLayer would drop"
        )
    return dataclasses.replace(spec, module=LoopedTransformerLayer)
