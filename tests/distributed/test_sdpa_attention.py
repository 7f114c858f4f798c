"""The SDPA core attention (model.attention_backend: sdpa) against Megatron's DotProductAttention:
same weights, same loss and gradients, on one rank and at TP=2; dropout
masks differ across tensor-parallel ranks (heads differ) as Megatron's do."""

import pytest
import torch

from megatron_ext.config import from_dict
from megatron_ext.parallel import ParallelSizes, full_named_tensors, load_full_named_tensors, main_grad_or_grad
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from tests.configs import SMALL

MODEL = {**SMALL["model"], "num_layers": 2, "ffn_hidden_size": 128}
SEQ = 32


def config(backend, tp=1, dropout=0.0):
    return from_dict(
        RunConfig,
        {
            "model": {**MODEL, "attention_backend": backend, "attention_dropout": dropout, "hidden_dropout": 0.0},
            # No sequence parallelism: without DDP's finalize step the norms' gradients stay partial per rank.
            "parallel": {"tensor": tp},
            "data": {"seq_length": SEQ},
        },
    )


def loss_and_grads(backend, weights=None, tp=1):
    from megatron_ext.run.builder import build_model

    (model,) = build_model(config(backend, tp), cuda=False)
    if weights is None:
        weights = full_named_tensors(model)
    load_full_named_tensors(model, weights)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL["vocab_size"], (2, SEQ + 1), generator=g)
    positions = torch.arange(SEQ).expand(2, SEQ)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    if tp > 1:  # QK-norm weights are replicated, each rank's heads give part of their gradient:
        from megatron.core import parallel_state  # finalize_model_grads sums them by name; so do we

        for name, param in model.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                torch.distributed.all_reduce(
                    main_grad_or_grad(param), group=parallel_state.get_tensor_model_parallel_group()
                )
    grads = full_named_tensors(model, select=main_grad_or_grad)
    return float(loss), grads, weights


def max_rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)


def test_sdpa_matches_megatron_dot_product_attention_on_one_rank_and_at_tp2():
    loss_local, grads_local, weights = run_distributed(loss_and_grads, 1, backend="local")[0]
    loss_sdpa, grads_sdpa, _ = run_distributed(loss_and_grads, 1, backend="sdpa", weights=weights)[0]
    assert abs(loss_sdpa - loss_local) <= 1e-5 * abs(loss_local)
    assert max_rel(grads_sdpa, grads_local) <= 1e-5
    for loss_tp, grads_tp, _ in run_distributed(
        loss_and_grads, 2, ParallelSizes(tp=2), backend="sdpa", weights=weights, tp=2
    ):
        assert abs(loss_tp - loss_local) <= 1e-5 * abs(loss_local)
        assert max_rel(grads_tp, grads_local) <= 1e-5


def dropout_outputs():
    """The core attention's output for identical inputs on each rank, with dropout 0.5."""
    from megatron.core import parallel_state

    from megatron_ext.models.attention import SDPACoreAttention
    from megatron_ext.run.builder import transformer_config

    core = SDPACoreAttention(transformer_config(config("sdpa", tp=2, dropout=0.5), cuda=False), layer_number=1)
    core.config.sequence_parallel = False  # the tracker fork applies without sequence parallelism
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(SEQ, 1, heads, 16, generator=g) for heads in (2, 1, 1))  # this rank's heads
    out = core(q, k, v)
    core.eval()
    return out, core(q, k, v), parallel_state.get_tensor_model_parallel_rank()


def test_attention_dropout_differs_across_tensor_parallel_ranks():
    (train0, eval0, _), (train1, eval1, _) = run_distributed(dropout_outputs, 2, ParallelSizes(tp=2))
    assert torch.equal(eval0, eval1)  # same inputs, no dropout: the same output
    assert not torch.equal(train0, train1)  # each rank's heads draw their own mask
    assert not torch.equal(train0, eval0)


def test_sdpa_refuses_what_it_does_not_compute():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext.models.attention import SDPACoreAttention

    cfg = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, context_parallel_size=2, attention_dropout=0.1
    )
    with pytest.raises(ValueError, match="no attention dropout under context parallelism.*attention_dropout: 0"):
        SDPACoreAttention(cfg, 1, AttnMaskType.causal)
    cfg.context_parallel_size = 1
    with pytest.raises(ValueError, match="padding"):
        SDPACoreAttention(cfg, 1, AttnMaskType.padding)
