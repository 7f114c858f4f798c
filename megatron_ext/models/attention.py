"""Causal core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Megatron-Core's local ``DotProductAttention`` computes the full ``[b, np, s, s]`` score matrix
with batched matmuls, a masked softmax and dropout: unfused, O(s^2) memory per layer. Without
Transformer Engine (CPU, or a GPU image without it) :class:`SDPACoreAttention` is the fused
alternative with the same call contract: query ``[s, b, np, hn]``, key / value ``[s, b, ng, hn]``
(this rank's heads after the TP split), output ``[s, b, np * hn]``. torch picks the kernel: flash
or memory-efficient attention on GPU, its fused flash-style kernel on CPU.

Attention dropout is drawn inside Megatron's model-parallel RNG tracker fork, as
``DotProductAttention`` does, so that ranks holding different heads draw different masks.

Under context parallelism the rank's two sequence chunks attend over the all-gathered keys and
values (:func:`~megatron_ext.models.context_attention.context_parallel_attention`); attention dropout
is not supported there.

Document masking (``data.reset_attention_mask``) arrives as ``attention_mask``: the document starts
of :mod:`~megatron_ext.models.documents` (int64 ``[b, s]``), turned into a boolean mask for SDPA.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_ext.models.context_attention import context_parallel_attention
from megatron_ext.models.documents import document_starts_of, visible_keys
from megatron_ext.parallel.context import context_parallel_of

__all__ = ["SDPACoreAttention"]


class SDPACoreAttention(MegatronModule):
    """Causal self-attention core for GPT layers (document masks; no padding masks, packed sequences or biases)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if config.context_parallel_size != 1 and dropout > 0:
            raise ValueError(
                f"SDPACoreAttention has no attention dropout under context parallelism (dropout {dropout}, "
                f"context_parallel_size={config.context_parallel_size}): set model.attention_dropout: 0"
            )
        if attn_mask_type != AttnMaskType.causal or attention_type != "self":
            raise ValueError(
                f"SDPACoreAttention does not support {attention_type} attention with mask type "
                f"{attn_mask_type} (causal self-attention only): set model.attention_backend: local for "
                "Megatron's DotProductAttention."
            )
        super().__init__(config=config)
        if pg_collection is None and config.context_parallel_size > 1:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        self.cp = context_parallel_of(pg_collection)
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def forward(
        self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError(
                "SDPACoreAttention computes causal attention over whole sequences: it takes no "
                "attention_bias or packed_seq_params (set model.attention_backend: local for those)"
            )
        if attn_mask_type is not None and attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention is causal; got attn_mask_type={attn_mask_type}")
        doc_start = document_starts_of(attention_mask)
        s, b, nq, hn = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, nq, s, hn]
        k = key.permute(1, 2, 0, 3)  # [b, nkv, s, hn]
        v = value.permute(1, 2, 0, 3)
        if self.cp is not None:
            out = context_parallel_attention(q, k, v, self.cp, self.softmax_scale, doc_start=doc_start)
            return out.permute(2, 0, 1, 3).reshape(s, b, nq * hn)
        dropout = self.dropout if self.training else 0.0
        # Causal, or causal within each document (a boolean mask: torch picks a kernel that takes one).
        mask = None if doc_start is None else visible_keys(s, s, doc_start, None, 0, q.device)
        sdpa = dict(attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=self.softmax_scale)
        gqa = q.shape[1] != k.shape[1]
        if dropout > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, **sdpa, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **sdpa, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * hn)
