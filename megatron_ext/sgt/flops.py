"""Analytical training FLOPs of a GPT step: vanilla, with SGT attention loops, with block loops.

Convention [choice] (what ``torch.utils.flop_counter.FlopCounterMode`` counts, so that the two agree):

* Only matrix multiplications count, ``2 m n k`` each; norms, softmax, RoPE, activations, the
  embedding lookup and the loss are left out.
* Attention scores and the probability-value product count the full ``T x T`` square even
  under a causal mask: ``2 T T d`` each per head and sequence. FlopCounterMode does the same for
  ``scaled_dot_product_attention`` (its formula ignores ``is_causal``) and for the unfused
  ``baddbmm`` / ``bmm`` of Megatron's ``DotProductAttention``. (On CPU, torch's fused flash kernel
  has no FlopCounterMode formula and counts 0: compare under SDPA's math backend.)
* Training = forward + backward = 3 x forward: the backward of every matmul is two matmuls of the
  same size (input and weight gradients). This is what FlopCounterMode measures for unfused
  attention and SDPA's math backend. For the fused SDPA kernels (flash, memory-efficient, cuDNN)
  FlopCounterMode's backward formula adds a recomputation of the scores, ``2.5 x`` the attention
  forward instead of ``2 x``; this module does not model that recomputation.

Per layer and sequence (``h`` hidden, ``n_q`` query and ``n_kv`` KV heads of dimension ``d``,
``F`` FFN size, ``T`` tokens), forward:

    attention sublayer(n_q, n_kv) = 2 T h (n_q + 2 n_kv) d     QKV projection
                                  + 4 T^2 n_q d                scores and PV
                                  + 2 T n_q d h                output projection
    MLP                           = 2 T h F (3 if SwiGLU else 2)

plus the output layer ``2 T h V``. A block loop adds the whole layer per pass; an SGT loop adds
``attention sublayer(kept query heads, their KV heads)`` per pass (the kept-heads path; every head
while a fade runs).

Attention is charged by the (query, key) pairs its kernel multiplies: ``4 P d`` for the scores and
PV of ``P`` pairs, ``P = T^2`` per full-attention head (the square, see above) and, for a
sliding-window head of a hybrid layer, the blocked window kernel's ``~T (W + bq)``
(:meth:`~megatron_ext.consa.attention.HybridCoreAttention.attention_pairs`); a structure gives the
pairs per layer (``LoopStructure.layer_key_pairs``, ``LoopedLayer.key_pairs``), and without them
every head is full. Layers an elastic step skips (``LoopStructure.skipped``) cost nothing, loops
included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Literal, Optional

__all__ = ["GPTShape", "LoopStructure", "LoopedLayer", "flops_overhead", "forward_flops", "training_flops"]

TRAINING_MULTIPLIER = 3
"""Forward + backward over forward, for matmuls (see the module docstring)."""


@dataclass(frozen=True)
class GPTShape:
    """What the FLOPs of a decoder-only GPT depend on."""

    hidden_size: int
    num_layers: int
    num_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """KV heads per layer (grouped-query attention); ``num_heads`` for multi-head attention."""
    head_dim: int
    ffn_hidden_size: int
    """Dense MLP inner size (per branch for SwiGLU)."""
    vocab_size: int
    """Rows of the output layer (the padded vocabulary)."""
    seq_length: int
    batch_size: int = 1
    """Sequences per step."""
    swiglu: bool = True
    """Gated MLP: three ``h x F`` matrices instead of two."""

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "ffn_hidden_size",
            "vocab_size",
            "seq_length",
            "batch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTShape.{name}={value!r} is not allowed: it must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"GPTShape.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")

    @classmethod
    def from_run_config(cls, cfg, padded_vocab_size: int) -> "GPTShape":
        """The shape of a run (``RunConfig``); [choice] MoE layers are counted as the dense MLP of
        ``model.ffn_hidden_size`` (an approximation: the overhead of a loop is then relative to a
        dense model of the same width)."""
        m = cfg.model
        return cls(
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            num_heads=m.num_attention_heads,
            num_kv_heads=m.num_query_groups or m.num_attention_heads,
            head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
            ffn_hidden_size=m.ffn_hidden_size,
            vocab_size=padded_vocab_size,
            seq_length=cfg.data.seq_length,
            batch_size=cfg.train.global_batch_size,
            swiglu=m.activation == "swiglu",
        )


@dataclass(frozen=True)
class LoopedLayer:
    """One looped layer of a structure."""

    depth: int
    """Extra passes."""
    query_heads: int
    """Query heads computed per SGT pass (the kept heads; every head while a fade is running)."""
    kv_heads: int
    """KV heads computed per SGT pass: the distinct KV groups of those query heads."""
    key_pairs: Optional[int] = None
    """(query, key) pairs per sequence of one pass, summed over its query heads; None: each head full
    (``query_heads * T^2``)."""


@dataclass(frozen=True)
class LoopStructure:
    """Which layers loop and how; an empty ``layers`` is the vanilla model."""

    method: Literal["sgt", "block"] = "sgt"
    layers: Dict[int, LoopedLayer] = field(default_factory=dict)
    """``{global layer index: LoopedLayer}``."""
    layer_key_pairs: Dict[int, int] = field(default_factory=dict)
    """(query, key) pairs per sequence of a layer's ordinary attention, summed over all its query
    heads; a layer absent here has every head full."""
    skipped: FrozenSet[int] = frozenset()
    """Layers not run in the step (elastic depth): neither the layer nor its loops count."""


def attention_sublayer_flops(shape: GPTShape, query_heads: int, kv_heads: int, key_pairs: Optional[int] = None) -> int:
    """Forward matmul FLOPs of one attention sublayer over the step's sequences; ``key_pairs`` per
    sequence over its query heads (None: ``query_heads * T^2``)."""
    h, d, t = shape.hidden_size, shape.head_dim, shape.seq_length
    pairs = query_heads * t * t if key_pairs is None else key_pairs
    per_sequence = (
        2 * t * h * (query_heads + 2 * kv_heads) * d  # QKV projection
        + 4 * pairs * d  # scores and PV
        + 2 * t * query_heads * d * h
    )  # output projection
    return shape.batch_size * per_sequence


def mlp_flops(shape: GPTShape) -> int:
    """Forward matmul FLOPs of one dense MLP over the step's sequences."""
    matrices = 3 if shape.swiglu else 2
    return shape.batch_size * 2 * shape.seq_length * shape.hidden_size * shape.ffn_hidden_size * matrices


def layer_flops(shape: GPTShape, key_pairs: Optional[int] = None) -> int:
    """Forward matmul FLOPs of one vanilla decoder layer (``key_pairs``: of its attention)."""
    return attention_sublayer_flops(shape, shape.num_heads, shape.num_kv_heads, key_pairs) + mlp_flops(shape)


def output_layer_flops(shape: GPTShape) -> int:
    """Forward matmul FLOPs of the logits."""
    return shape.batch_size * 2 * shape.seq_length * shape.hidden_size * shape.vocab_size


def loop_flops(shape: GPTShape, structure: LoopStructure) -> int:
    """Forward matmul FLOPs that the loops of ``structure`` add."""
    total = 0
    for index, looped in structure.layers.items():
        if not 0 <= index < shape.num_layers:
            raise ValueError(f"looped layer {index} is outside [0, {shape.num_layers})")
        if index in structure.skipped:
            continue
        if structure.method == "block":
            per_pass = layer_flops(shape, structure.layer_key_pairs.get(index))
        else:
            if not (0 <= looped.query_heads <= shape.num_heads and 0 <= looped.kv_heads <= shape.num_kv_heads):
                raise ValueError(
                    f"layer {index}: {looped.query_heads} query / {looped.kv_heads} KV heads do not "
                    f"fit {shape.num_heads} / {shape.num_kv_heads}"
                )
            per_pass = attention_sublayer_flops(shape, looped.query_heads, looped.kv_heads, looped.key_pairs)
        total += looped.depth * per_pass
    return total


def forward_flops(
    shape: GPTShape, structure: Optional[LoopStructure] = None, output_layer: bool = True, loops: bool = True
) -> int:
    """Forward matmul FLOPs of one step; ``structure=None`` is the vanilla model with full attention.
    ``output_layer=False`` leaves the logits out (the decoder layers only); ``loops=False`` counts
    ``structure``'s model without its loops (its attention pairs and skipped layers still apply).
    """
    structure = structure if structure is not None else LoopStructure()
    total = sum(
        layer_flops(shape, structure.layer_key_pairs.get(i))
        for i in range(shape.num_layers)
        if i not in structure.skipped
    )
    total += output_layer_flops(shape) if output_layer else 0
    return total + (loop_flops(shape, structure) if loops else 0)


def training_flops(shape: GPTShape, structure: Optional[LoopStructure] = None, output_layer: bool = True) -> int:
    """Forward + backward matmul FLOPs of one step (3 x forward)."""
    return TRAINING_MULTIPLIER * forward_flops(shape, structure, output_layer)


def flops_overhead(shape: GPTShape, structure: LoopStructure, output_layer: bool = True) -> float:
    """Training FLOPs of ``structure`` relative to the same model and step without loops, minus 1
    (0.014 = +1.4 %). The same for forward-only FLOPs, since both are 3 x forward.
    ``output_layer=False`` compares the decoder layers only (then a block loop of k of L full-attention
    layers is exactly k / L).
    """
    return loop_flops(shape, structure) / forward_flops(shape, structure, output_layer=output_layer, loops=False)
