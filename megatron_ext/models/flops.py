"""Model FLOPs per token of a training step: the numerator of MFU.

Counted from the model's structure in the step that ran, per token, by the convention of
:mod:`megatron_ext.sgt.flops` (what ``torch.utils.flop_counter.FlopCounterMode`` counts): matrix
multiplications only, ``2 m n k`` each; training = 3 x forward (every matmul's backward is two of
the same size); attention scores and PV ``4 d`` per (query, key) pair the kernel multiplies, the
full ``T`` keys per query for full attention (causal masking not halved, as PaLM's and torchtitan's
MFU formulas count it), a sliding window's blocked-kernel keys for a window head. Work that is not
the model's (activation recompute, SGT's entropy tracking) is left out, as MFU leaves it out.

The core fills a dense model with full attention from the config (:meth:`ModelCost.from_config`);
each capability's callback then changes what its method changes in that step
(:meth:`megatron_ext.capability.Callback.adjust_cost`): MoE layers and the elastic sub-network
(top-k, skipped layers), hybrid attention (window heads, or both kernels during mask learning),
loops (extra attention passes), multi-token prediction (its layers and output layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

from megatron_ext.config import ModelConfig

__all__ = ["LayerCost", "ModelCost", "TRAINING_MULTIPLIER", "dense_layer_cost", "mlp_flops_per_token"]

TRAINING_MULTIPLIER = 3
"""Forward + backward over forward, for matmuls."""


def mlp_flops_per_token(hidden_size: int, ffn_hidden_size: int, swiglu: bool) -> int:
    """Forward matmul FLOPs per token of one dense MLP (three ``h x F`` matrices when gated)."""
    return 2 * hidden_size * ffn_hidden_size * (3 if swiglu else 2)


@dataclass
class LayerCost:
    """What one decoder layer computes per token in a step."""

    query_heads: int
    kv_heads: int
    attention_keys: float
    """Keys multiplied per query, summed over the query heads (``query_heads * T`` when all full)."""
    mlp: int
    """Forward matmul FLOPs per token of the MLP sublayer (dense, or router + top-k experts + shared)."""
    extra_attention: List[Tuple[int, int, float]] = field(default_factory=list)
    """Extra attention passes: ``(query heads, KV heads, keys per query summed over those heads)``."""
    passes: int = 1
    """Times the whole layer runs (a block loop adds passes)."""
    skipped: bool = False
    """Not run in this step (elastic depth): costs nothing."""


def dense_layer_cost(m: ModelConfig, seq_length: int) -> LayerCost:
    """A decoder layer of the model section ``m`` with a dense MLP and full attention over
    ``seq_length`` tokens."""
    heads = m.num_attention_heads
    return LayerCost(
        heads,
        m.num_query_groups or heads,
        float(heads * seq_length),
        mlp_flops_per_token(m.hidden_size, m.ffn_hidden_size, m.activation == "swiglu"),
    )


@dataclass
class ModelCost:
    """A training step's model FLOPs per token, layer by layer."""

    hidden_size: int
    head_dim: int
    seq_length: int
    vocab_size: int
    """Rows of the output layer (the padded vocabulary)."""
    layers: List[LayerCost]
    mtp_layers: List[LayerCost] = field(default_factory=list)
    """Multi-token-prediction layers: each adds its decoder layer, the ``2h -> h`` projection and an
    output layer."""

    @classmethod
    def from_config(cls, m: ModelConfig, seq_length: int, padded_vocab_size: int) -> "ModelCost":
        """The dense model of the model section ``m`` with full attention in every layer."""
        return cls(
            m.hidden_size,
            m.kv_channels or m.hidden_size // m.num_attention_heads,
            seq_length,
            padded_vocab_size,
            [dense_layer_cost(m, seq_length) for _ in range(m.num_layers)],
        )

    def attention_flops(self, query_heads: int, kv_heads: int, keys: float) -> float:
        """Forward FLOPs per token of an attention sublayer: QKV and output projections, scores + PV."""
        h, d = self.hidden_size, self.head_dim
        return 2 * h * (query_heads + 2 * kv_heads) * d + 4 * d * keys + 2 * query_heads * d * h

    def layer_flops(self, layer: LayerCost) -> float:
        """Forward FLOPs per token of one layer in this step, its passes and extra attention included."""
        if layer.skipped:
            return 0.0
        once = self.attention_flops(layer.query_heads, layer.kv_heads, layer.attention_keys) + layer.mlp
        return layer.passes * once + sum(self.attention_flops(q, kv, keys) for q, kv, keys in layer.extra_attention)

    def output_flops(self) -> float:
        return 2.0 * self.hidden_size * self.vocab_size

    def forward_flops_per_token(self) -> float:
        total = sum(self.layer_flops(layer) for layer in self.layers) + self.output_flops()
        projection = 2.0 * (2 * self.hidden_size) * self.hidden_size
        return total + sum(self.layer_flops(layer) + projection + self.output_flops() for layer in self.mtp_layers)

    def training_flops_per_token(self) -> float:
        """``model_flops_per_token``: forward + backward."""
        return TRAINING_MULTIPLIER * self.forward_flops_per_token()
