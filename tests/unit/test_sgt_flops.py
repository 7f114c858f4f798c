"""Analytical SGT / block-loop FLOPs against torch's FlopCounterMode on a real looped GPTModel.

The model runs on one gloo rank (Megatron's parallel state needs a process group); the counter
measures one forward + backward. SDPA runs on its math backend, whose matmuls FlopCounterMode
counts (the fused CPU kernel has no FLOP formula); its count is what the analytical convention
assumes (full T x T, backward = 2 x forward).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_ext.models.layer_spec import decoder_block_spec, gpt_layer_spec
from megatron_ext.sgt.flops import GPTShape, LoopedLayer, LoopStructure, flops_overhead, training_flops
from megatron_ext.sgt.looped_layer import LoopedTransformerLayer, looped_layer_spec
from megatron_ext.testing.distributed import run_distributed

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, SEQ, BATCH = 3, 64, 4, 2, 96, 128, 32, 2

# name: (method, {layer: (depth, head factors)}, analytical {layer: LoopedLayer})
STRUCTURES = {
    "vanilla": ("sgt", {}, {}),
    "sgt: 2 kept heads in 1 and 2 KV groups": (
        "sgt",
        {1: (1, [1.0, 0.0, 0.0, 1.0]), 2: (2, [1.0, 1.0, 0.0, 0.0])},
        {1: LoopedLayer(1, 2, 2), 2: LoopedLayer(2, 2, 1)},
    ),
    "sgt: fading (every head computed)": ("sgt", {2: (1, [1.0, 0.5, 0.5, 1.0])}, {2: LoopedLayer(1, HEADS, KV_HEADS)}),
    "block": (
        "block",
        {1: (1, [1.0] * HEADS), 2: (1, [1.0] * HEADS)},
        {1: LoopedLayer(1, HEADS, KV_HEADS), 2: LoopedLayer(1, HEADS, KV_HEADS)},
    ),
}


def measured_training_flops(loops, method, swiglu):
    """FlopCounterMode's count of one forward + backward of a looped GPTModel."""
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=KV_HEADS,
        ffn_hidden_size=FFN,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )
    spec = decoder_block_spec(config, [looped_layer_spec(gpt_layer_spec())] * LAYERS)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    for layer in gpt.modules():
        if isinstance(layer, LoopedTransformerLayer) and layer.layer_index in loops:
            depth, factors = loops[layer.layer_index]
            layer.set_loop(depth, method)
            layer.set_head_factors(factors)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        losses = gpt(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
        losses.mean().backward()
    return counter.get_total_flops()


def measure_all():
    results = {
        name: measured_training_flops(loops, method, swiglu=True) for name, (method, loops, _) in STRUCTURES.items()
    }
    results["vanilla, GELU MLP"] = measured_training_flops({}, "sgt", swiglu=False)
    return results


def test_analytical_flops_match_flop_counter():
    measured = run_distributed(measure_all, 1)[0]
    shape = GPTShape(
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        ffn_hidden_size=FFN,
        vocab_size=VOCAB,
        seq_length=SEQ,
        batch_size=BATCH,
    )
    expected = {
        name: training_flops(shape, LoopStructure(method, layers) if layers else None)
        for name, (method, _, layers) in STRUCTURES.items()
    }
    gelu = dataclasses.replace(shape, swiglu=False)
    expected["vanilla, GELU MLP"] = training_flops(gelu)
    for name, value in expected.items():
        error = measured[name] / value - 1.0
        print(f"[flops] {name}: analytical {value:,} measured {measured[name]:,} ({error:+.4%})")
        assert abs(error) <= 0.01, f"{name}: analytical {value} vs FlopCounterMode {measured[name]}"


# The released 300M configuration (configs/OLMo-300M-...yaml of the authors' repository): d_model
# 1024, 16 layers, 16 heads (MHA, head dim 64), SwiGLU with mlp_ratio 8, i.e. 8192 / 2 = 4096 per
# branch, embedding size 50304 (vocabulary 50280 padded), sequence 4096. Three layers loop once,
# 2 of their 16 heads kept.
RELEASED_300M = GPTShape(
    hidden_size=1024,
    num_layers=16,
    num_heads=16,
    num_kv_heads=16,
    head_dim=64,
    ffn_hidden_size=4096,
    vocab_size=50304,
    seq_length=4096,
)
SGT_3_LAYERS = LoopStructure("sgt", {layer: LoopedLayer(1, 2, 2) for layer in (15, 12, 9)})
BLOCK_3_LAYERS = LoopStructure("block", {layer: LoopedLayer(1, 16, 16) for layer in (15, 12, 9)})


@pytest.mark.parametrize("ffn", [4096, 2816], ids=["released-ffn4096", "ffn2816"])
def test_overhead_of_the_300m_shape(ffn):
    shape = dataclasses.replace(RELEASED_300M, ffn_hidden_size=ffn)
    sgt, block = flops_overhead(shape, SGT_3_LAYERS), flops_overhead(shape, BLOCK_3_LAYERS)
    sgt_layers = flops_overhead(shape, SGT_3_LAYERS, output_layer=False)
    block_layers = flops_overhead(shape, BLOCK_3_LAYERS, output_layer=False)
    print(
        f"[flops] 300M (FFN {ffn}, T 4096), 3 looped layers, 2/16 heads, depth 1: SGT {sgt:+.3%}, block "
        f"{block:+.3%}; decoder layers only (no logits): SGT {sgt_layers:+.3%}, block {block_layers:+.3%}"
    )
    assert block_layers == pytest.approx(3 / 16)
    # An SGT pass costs 2/16 of an attention sublayer: 1/8 of its share of a layer.
    assert sgt_layers == pytest.approx(
        block_layers
        / 8
        * (1 - 6 * shape.ffn_hidden_size / ((8 * shape.hidden_size + 4 * shape.seq_length) + 6 * shape.ffn_hidden_size))
    )
    assert 0.009 < sgt < 0.015 and 0.16 < block < 0.19
