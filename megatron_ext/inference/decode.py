"""Prefill and one-token decode steps of a ``GPTModel`` with a KV cache per attention pass.

The decoder runs the model's own modules (embedding, norms, ``linear_qkv`` with its QK-norms,
RoPE, ``linear_proj``, the dense MLP or the ``MoELayer``, the output layer) in the order of each
layer's forward, and differs from the ordinary forward only in where attention reads its keys:

* prefill: the whole prompt through the layer's core attention module (the kernels of training),
  its keys and values written to the caches;
* decode: one new token per sequence; its key and value join the caches and its query attends over
  them (:class:`~megatron_ext.inference.cache.AttentionCache`: full heads every key, sliding-window
  heads a ring buffer of their window).

What a layer does comes from the layer and its core attention, not from this module, through the
protocols of :mod:`megatron_ext.models.protocols`: a :class:`DecodePassesLayer` (the SGT looped
layer) lists its passes, ``("attention", head factors or None)`` and ``("mlp", None)``, each
attention pass with a cache of its own because its keys are computed from that pass's input; a
:class:`KeyPlanAttention` core (hybrid attention) says per KV head which keys it sees; a
:class:`KeptHeadsLayer` computes a loop pass's kept query heads alone. MoE routing runs per token as
in training (the enabled capabilities' batch hooks are called before each forward). One process,
TP = PP = 1.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_ext.compat.layers import direct_linear_layers, direct_linears
from megatron_ext.inference.cache import AttentionCache
from megatron_ext.models.protocols import (
    DecodePass,
    DecodePassesLayer,
    HeadSubsetAttention,
    KeptHeadsLayer,
    KeyPlanAttention,
    QueryHeadSubsetAttention,
)
from megatron_ext.models.rope import rotary_table, rotate_query_key

VANILLA_PASSES = [("attention", None), ("mlp", None)]


def _whole_groups(core) -> bool:
    """Whether ``core`` selects heads by whole KV groups (a :class:`HeadSubsetAttention` that is not
    a :class:`QueryHeadSubsetAttention`)."""
    return isinstance(core, HeadSubsetAttention) and not isinstance(core, QueryHeadSubsetAttention)


def decode_passes(layer) -> List[DecodePass]:
    """``layer``'s passes (:meth:`DecodePassesLayer.decode_passes`); a plain layer's are attention, then MLP."""
    return layer.decode_passes() if isinstance(layer, DecodePassesLayer) else list(VANILLA_PASSES)


class Decoder:
    """Cached decoding of one ``GPTModel`` (unwrapped, eval mode, one process)."""

    def __init__(self, model, batch_hooks: Sequence[Callable] = ()):
        from megatron.core import parallel_state

        if (
            parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1
        ):
            raise ValueError("cached decoding runs the whole model in one process (TP = PP = 1)")
        self.model = model.eval()
        self.batch_hooks = list(batch_hooks)
        self.layers = list(model.decoder.layers)
        self.passes = [decode_passes(layer) for layer in self.layers]
        # Decided once (the protocols' isinstance checks cost more than a decode step's arithmetic):
        # which layers compute a loop pass's kept query heads alone (not where whole KV groups are
        # the unit), and the linear layers computed without Megatron's tensor-parallel machinery.
        self.kept_heads = [
            isinstance(layer, KeptHeadsLayer) and not _whole_groups(layer.self_attention.core_attention)
            for layer in self.layers
        ]
        self.direct_linears = direct_linear_layers(model)
        config = model.config
        self.head_dim = config.kv_channels
        self.num_kv_heads = config.num_query_groups
        self.queries_per_group = config.num_attention_heads // config.num_query_groups
        self._rope: Optional[Tensor] = None  # RoPE frequencies of positions 0.., [n, 1, 1, hn]
        self.scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    # -- caches --------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> Dict[Tuple[int, int], AttentionCache]:
        """Empty caches for ``batch`` sequences of up to ``capacity`` positions: one per (layer,
        attention pass)."""
        dtype = self.model.embedding.word_embeddings.weight.dtype
        device = self.model.embedding.word_embeddings.weight.device
        caches = {}
        for i, layer in enumerate(self.layers):
            core = layer.self_attention.core_attention
            plans = core.kv_cache_plan() if isinstance(core, KeyPlanAttention) else [(None, 0)] * self.num_kv_heads
            attention_factors = [factors for kind, factors in self.passes[i] if kind == "attention"]
            for p, factors in enumerate(attention_factors):
                caches[(i, p)] = AttentionCache(
                    self._needed(plans, factors),
                    batch=batch,
                    capacity=capacity,
                    head_dim=self.head_dim,
                    queries_per_group=self.queries_per_group,
                    dtype=dtype,
                    device=device,
                )
        return caches

    def _needed(self, plans: List, factors: Optional[List[float]]) -> List:
        """``plans`` with None for the KV heads a pass never reads: those whose query heads all have
        the factor 0 in a loop pass (the output of such a head is multiplied by 0)."""
        if factors is None:
            return plans
        read = {head // self.queries_per_group for head, factor in enumerate(factors) if factor != 0}
        return [plan if kv in read else None for kv, plan in enumerate(plans)]

    @staticmethod
    def cache_bytes(caches: Dict[Tuple[int, int], AttentionCache]) -> int:
        return sum(cache.nbytes() for cache in caches.values())

    # -- forward -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, tokens: Tensor, caches, last_only: bool = False) -> Tensor:
        """Logits ``[b, s, vocab]`` of a ``[b, s]`` prompt (positions 0..s-1); fills ``caches``.
        ``last_only``: the last position's alone, ``[b, 1, vocab]`` (what sampling needs: the output
        layer, the largest product of a small model's prefill, then runs on one row, not ``s``)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        with direct_linears(self.direct_linears):
            return self._forward(tokens, positions, caches, prefill=True, last_only=last_only)

    @torch.no_grad()
    def step(self, tokens: Tensor, position: int, caches) -> Tensor:
        """Logits ``[b, vocab]`` of one new token per sequence (``[b]``) at ``position``."""
        from megatron_ext.compat.cpu import cuda_redirect_suspended

        positions = torch.tensor([position], device=tokens.device)
        # A cached step names no CUDA device (the prefill may: Megatron's local attention builds its
        # causal mask on "cuda"), so on CPU it runs without the per-op Python dispatch of the CPU mode.
        with cuda_redirect_suspended(), direct_linears(self.direct_linears):
            return self._forward(tokens.view(-1, 1), positions, caches, prefill=False)[:, -1]

    def _forward(self, tokens: Tensor, positions: Tensor, caches, prefill: bool, last_only: bool = False) -> Tensor:
        model = self.model
        batch = {
            "tokens": tokens,
            "position_ids": positions.expand(tokens.shape[0], -1),
            "modality_ids": torch.zeros_like(tokens, dtype=torch.uint8),
        }
        for hook in self.batch_hooks:
            hook(model, batch)
        hidden = model.embedding(input_ids=tokens, position_ids=batch["position_ids"])  # [s, b, h]
        rope = None
        if getattr(model, "rotary_pos_emb", None) is not None and model.position_embedding_type in ("rope", "yarn"):
            needed = int(positions[-1]) + 1
            if self._rope is None or self._rope.shape[0] < needed:  # the table grows, then is reused
                self._rope = rotary_table(model, max(needed, 2 * (0 if self._rope is None else self._rope.shape[0])))
            rope = self._rope[positions]  # [s, 1, 1, hn]; a scaled RoPE's rows (YaRN's factor in rotate_query_key)
        for i, layer in enumerate(self.layers):
            attention_pass = 0
            for kind, factors in self.passes[i]:
                if kind == "attention":
                    hidden = self._attention(
                        i,
                        hidden,
                        rope,
                        positions,
                        caches[(i, attention_pass)],
                        factors,
                        prefill=prefill,
                        loop=attention_pass > 0 and factors is not None,
                    )
                    attention_pass += 1
                else:
                    hidden = self._mlp(layer, hidden)
        if last_only:
            hidden = hidden[-1:]  # [1, b, h]: the norm and the output layer act on each position alone
        hidden = model.decoder.final_layernorm(hidden)
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(hidden, weight=weight)
        return logits.transpose(0, 1).float()  # [b, s, vocab]

    def _attention(
        self,
        i: int,
        hidden: Tensor,
        rope,
        positions: Tensor,
        cache: AttentionCache,
        factors: Optional[List[float]],
        *,
        prefill: bool,
        loop: bool,
    ) -> Tensor:
        layer = self.layers[i]
        attn = layer.self_attention
        if loop and self.kept_heads[i] and 1.0 in factors and set(factors) <= {0.0, 1.0}:
            return self._kept_heads_attention(layer, hidden, rope, positions, cache, factors, prefill=prefill)
        query, key, value = attn.get_query_key_value_tensors(layer.input_layernorm(hidden), None)
        query, key = rotate_query_key(attn, layer.layer_number, query, key, rope)
        cache.write(key, value, positions)
        if not prefill:
            context = cache.attend(query, int(positions[-1]), self.scale)
        elif loop:  # a loop pass attends as the looped layer's training forward does
            context = self._causal(attn.core_attention, query, key, value)
        else:
            context = attn.core_attention(query, key, value, None)
        if factors is not None:
            f = torch.tensor(factors, dtype=context.dtype, device=context.device).repeat_interleave(self.head_dim)
            context = context * f
        output, bias = attn.linear_proj(context)
        return hidden + output + (bias if bias is not None else 0)

    def _kept_heads_attention(
        self,
        layer,
        hidden: Tensor,
        rope,
        positions: Tensor,
        cache: AttentionCache,
        factors: List[float],
        *,
        prefill: bool,
    ) -> Tensor:
        """A loop pass whose factors are all 0 or 1, as the looped layer's training forward computes
        it: the QKV rows and output columns of the kept query heads and their KV groups only."""
        attn, hn = layer.self_attention, self.head_dim
        kept = [head for head, factor in enumerate(factors) if factor == 1.0]
        groups = sorted({head // self.queries_per_group for head in kept})
        q, k, v = layer.kept_heads_qkv(layer.input_layernorm(hidden), kept, groups)
        s, b = q.shape[:2]
        q, k, v = (t.unflatten(-1, (-1, hn)) for t in (q, k, v))
        if attn.q_layernorm is not None:
            q = attn.q_layernorm(q)
        if attn.k_layernorm is not None:
            k = attn.k_layernorm(k)
        q, k = rotate_query_key(attn, layer.layer_number, q, k, rope)
        # The cache takes every KV head in its place (zeros elsewhere) and holds the kept groups only (_needed).
        key = k.new_zeros(s, b, self.num_kv_heads, hn)
        value = torch.zeros_like(key)
        key[:, :, groups], value[:, :, groups] = k, v
        cache.write(key, value, positions)
        if prefill:  # the kept query heads over their groups' keys, with the layer's own kernels
            context = layer.attend_heads(
                q, k, v, [groups.index(head // self.queries_per_group) for head in kept], groups
            ).flatten(2)
        else:
            query = q.new_zeros(s, b, len(factors), hn)
            query[:, :, kept] = q
            context = cache.attend(query, int(positions[-1]), self.scale).unflatten(-1, (-1, hn))[:, :, kept].flatten(2)
        output = layer.kept_heads_proj(context, kept)
        bias = attn.linear_proj.bias
        return hidden + output + (bias if bias is not None else 0)

    def _causal(self, core, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        if isinstance(core, HeadSubsetAttention):
            return core.forward_heads(query, key, value, list(range(key.shape[2])))
        s, b, nq, hn = query.shape
        q = query.permute(1, 2, 0, 3)
        k = key.repeat_interleave(self.queries_per_group, dim=2).permute(1, 2, 0, 3)
        v = value.repeat_interleave(self.queries_per_group, dim=2).permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * hn)

    @staticmethod
    def _mlp(layer, hidden: Tensor) -> Tensor:
        output, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
        return hidden + output + (bias if bias is not None else 0)
