"""Megatron's selective recompute of ``layernorm`` and ``moe_act`` on CPU, without Transformer Engine.

In megatron-core 0.16.1 both raise ``NameError: FP8GlobalStateManager`` without TE
(:mod:`megatron_ext.compat.recompute`); ``moe_act`` also needs grouped-GEMM experts, which the CPU
layer provides. A tiny MoE GPT built from a ``TransformerConfig`` with
``recompute_modules=["layernorm", "moe_act"]`` must give exactly the loss and gradients of the
same model without recompute, on one rank, at TP=2 (sequence parallel) and at EP=2.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.parallel import ParallelSizes
from megatron_ext.testing.distributed import run_distributed

VOCAB = 128
SEQ = 16
RECOMPUTE = ["layernorm", "moe_act"]


def build_moe_gpt(recompute_modules):
    """Two MoE layers with grouped-GEMM experts (bf16: Megatron's GroupedMLP supports only bf16)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.models.layer_spec import decoder_block_spec, gpt_layer_spec

    tp = parallel_state.get_tensor_model_parallel_world_size()
    kwargs = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        bf16=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_grouped_gemm=True,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
    )
    if recompute_modules:
        kwargs.update(recompute_granularity="selective", recompute_modules=list(recompute_modules))
    config = TransformerConfig(**kwargs)
    spec = decoder_block_spec(config, [gpt_layer_spec(num_experts=4, moe_grouped_gemm=True)] * 2)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def loss_and_grads(model):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    positions = torch.arange(SEQ).expand(2, SEQ)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def recompute_against_plain():
    """This rank's loss and gradients without and with recompute, from the same weights."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    plain = build_moe_gpt([])
    recomputed = build_moe_gpt(RECOMPUTE)
    recomputed.load_state_dict(plain.state_dict())
    layers = list(recomputed.decoder.layers)
    exercised = all(
        layer.recompute_input_layernorm
        and layer.recompute_pre_mlp_layernorm
        and isinstance(layer.mlp.experts, GroupedMLP)
        and layer.mlp.experts.activation_recompute
        for layer in layers
    )
    return {"plain": loss_and_grads(plain), "recompute": loss_and_grads(recomputed), "exercised": exercised}


@pytest.mark.parametrize(
    "world_size,sizes",
    [(1, ParallelSizes()), (2, ParallelSizes(tp=2)), (2, ParallelSizes(ep=2))],
    ids=["1rank", "tp2", "ep2"],
)
def test_selective_recompute_of_layernorm_and_moe_act_matches_no_recompute(world_size, sizes):
    for rank, out in enumerate(run_distributed(recompute_against_plain, world_size, sizes)):
        assert out["exercised"], "the layers did not take Megatron's layernorm / moe_act recompute paths"
        (loss, grads), (loss_r, grads_r) = out["plain"], out["recompute"]
        assert torch.equal(loss_r, loss), f"rank {rank}: loss {float(loss_r)} with recompute, {float(loss)} without"
        assert grads_r.keys() == grads.keys()
        for name in grads:
            assert torch.equal(grads_r[name], grads[name]), f"rank {rank}: gradient of {name} differs"
