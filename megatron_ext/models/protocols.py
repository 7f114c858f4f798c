"""Interfaces that one method's modules offer to another's: the SGT loop and the cached decoder
ask a core attention or a layer for them, and a hybrid full / sliding-window core attention (ConSA)
or a looped layer (SGT) provides them.

Every protocol is structural and ``runtime_checkable``: a module offers one by defining its methods,
and a caller tests ``isinstance(module, Protocol)`` and falls back to plain causal attention (or to
the vanilla layer) when it does not. Each protocol is a single seam that callers test on its own:
a core attention may, for instance, attend over whole KV groups (:class:`HeadSubsetAttention`)
without computing arbitrary query heads (:class:`QueryHeadSubsetAttention`).

Shapes follow Megatron's attention: ``s`` sequence, ``b`` batch, ``hn`` head dimension, ``h``
hidden size; heads and KV heads (query groups) are this tensor-parallel rank's, indexed locally
(``0 .. local KV heads - 1``), each KV head serving ``qpg`` consecutive query heads.
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from torch import Tensor

__all__ = [
    "AttentionPairCounter",
    "DecodePass",
    "DecodePassesLayer",
    "HeadSubsetAttention",
    "KeptHeadsLayer",
    "KeyPlan",
    "KeyPlanAttention",
    "QueryHeadSubsetAttention",
]

KeyPlan = Tuple[Optional[int], int]
"""``(window, sink)``: the keys one KV head's queries attend to. ``window`` None: every earlier key
(full causal attention); else the last ``window`` keys (the query's own included) and the first
``sink`` keys of the sequence."""

DecodePass = Tuple[str, Optional[List[float]]]
"""One pass of a layer's forward: ``("attention", factors)``, the attention sublayer with its
residual (``factors``: one per query head of the whole layer for a loop pass, None for an ordinary
pass), or ``("mlp", None)``, the MLP sublayer with its residual."""


# -- core attention ------------------------------------------------------------------------------


@runtime_checkable
class HeadSubsetAttention(Protocol):
    """A core attention that attends for a subset of its KV heads, each with its own kernel."""

    def forward_heads(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        local_kv_heads: Sequence[int],
        attention_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Causal attention of the query heads of the listed KV heads.

        Args:
            query: ``[s, b, len(local_kv_heads) * qpg, hn]``, the query heads of the listed KV heads,
                group after group in their order.
            key, value: ``[s, b, len(local_kv_heads), hn]``.
            local_kv_heads: the local KV-head index of each position in ``key``, whose attention
                (full or sliding window) applies to it and its query heads.
            attention_mask: what the layer was handed: None, or the document starts of
                :mod:`~megatron_ext.models.documents` (document masking).

        Returns:
            ``[s, b, nq * hn]``, the attention output of the ``nq`` query heads in ``query``'s order;
            with every local KV head listed, what the module's ``forward`` returns.
        """
        ...


@runtime_checkable
class QueryHeadSubsetAttention(Protocol):
    """A core attention that attends for any subset of its query heads (and computes no others)."""

    def forward_query_heads(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        kv_of_query: Sequence[int],
        local_kv_heads: Sequence[int],
        attention_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Causal attention of ``nq`` query heads, each over its own KV head.

        Args:
            query: ``[s, b, nq, hn]``.
            key, value: ``[s, b, nkv, hn]``.
            kv_of_query: ``[nq]``, the position in ``key`` of query head ``i``'s KV head.
            local_kv_heads: ``[nkv]``, the local KV-head index of each position in ``key``, whose
                attention (full or sliding window) applies to the query heads it serves.
            attention_mask: as for :meth:`HeadSubsetAttention.forward_heads`.

        Returns:
            ``[s, b, nq * hn]``, the attention output of the query heads in ``query``'s order.
        """
        ...


@runtime_checkable
class KeyPlanAttention(Protocol):
    """A core attention whose KV heads do not all attend to every earlier key."""

    def attended_keys(self) -> List[KeyPlan]:
        """The :data:`KeyPlan` of each local KV head, ``[local KV heads]``: the keys its queries see
        (what an attention-entropy measurement normalises over). A head that mixes several kernels
        reports the widest."""
        ...

    def kv_cache_plan(self) -> List[KeyPlan]:
        """:meth:`attended_keys` for cached decoding: the keys each local KV head's cache must keep.

        Raises:
            ValueError: the module's current mode cannot be decoded from a cache.
        """
        ...


@runtime_checkable
class AttentionPairCounter(Protocol):
    """A core attention, or a layer, that says how much attention its kernels compute."""

    def attention_pairs(self, seq_length: int) -> List[int]:
        """Per local KV head, ``[local KV heads]``: the (query, key) score pairs that the kernels
        multiply for one of its query heads over one sequence of ``seq_length`` tokens (``seq_length
        ** 2`` for full attention computed as the whole square); the FLOP count's attention term."""
        ...


# -- transformer layer ---------------------------------------------------------------------------


@runtime_checkable
class DecodePassesLayer(Protocol):
    """A transformer layer whose forward is not one attention then one MLP sublayer."""

    def decode_passes(self) -> List[DecodePass]:
        """The layer's forward as its sublayer passes, in order (see :data:`DecodePass`). Every
        attention pass attends over keys and values computed from its own input, so cached decoding
        keeps one KV cache per attention pass."""
        ...


@runtime_checkable
class KeptHeadsLayer(Protocol):
    """A transformer layer that runs its attention sublayer for a subset of its query heads only: the
    rows of the QKV weight and the columns of the output weight that belong to them (local weights,
    no tensor-parallel communication)."""

    def kept_heads_qkv(
        self, normed: Tensor, query_heads: Sequence[int], groups: Sequence[int]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The fused QKV projection of the listed local query heads and KV heads (groups) only.

        Args:
            normed: ``[s, b, h]``, the attention sublayer's normalised input.
            query_heads: local query-head indices, ``nq`` of them.
            groups: local KV-head indices, ``ng`` of them.

        Returns:
            ``(query [s, b, nq * hn], key [s, b, ng * hn], value [s, b, ng * hn])`` in the listed
            orders, with the projection's bias and before the QK norms and RoPE.
        """
        ...

    def attend_heads(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        kv_of_query: Sequence[int],
        local_kv_heads: Sequence[int],
        attention_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """The layer's causal attention of ``nq`` query heads, each over its own KV head.

        Args: as :meth:`QueryHeadSubsetAttention.forward_query_heads` (query ``[s, b, nq, hn]``, key
            and value ``[s, b, nkv, hn]``, post-RoPE; ``attention_mask`` None or document starts).

        Returns:
            ``[s, b, nq, hn]``, with the kernels the layer's core attention uses for those heads.
        """
        ...

    def kept_heads_proj(self, context: Tensor, query_heads: Sequence[int]) -> Tensor:
        """The output projection of the listed local query heads' attention output.

        Args:
            context: ``[s, b, nq * hn]``, the heads in ``query_heads``'s order.
            query_heads: local query-head indices, ``nq`` of them.

        Returns:
            ``[s, b, h]``, this rank's partial sum, without the projection's bias and before the
            tensor-parallel reduction.
        """
        ...
