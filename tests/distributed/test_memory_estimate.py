"""The planner's activation estimate against what a layer really keeps for backward: the bytes of
every tensor autograd saves in one layer's forward (parameters excluded), measured on the CPU, in
fp32 (twice the estimate's 16-bit bytes). Margin [choice]: within a factor 0.7 .. 1.5 of the
estimate for a GELU layer with a 4h MLP (the shape the formula describes), with the score matrix
counted where the attention stores it (Megatron's unfused attention) and not where it does not
(SDPA): at s / h = 4 the score term would be 2.4x the rest, so counting it wrongly fails either way."""

import pytest
import torch

from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from tests.configs import TINY, merge

MARGIN = (0.7, 1.5)


def config(backend):
    return merge(
        TINY,
        {
            "model": {
                "hidden_size": 128,
                "num_attention_heads": 4,
                "num_query_groups": None,
                "ffn_hidden_size": 512,
                "activation": "gelu",
                "attention_backend": backend,
                # The formula counts attention dropout; the CPU's SDPA would fall back to its unfused
                # kernel with it (on a GPU the flash kernel drops out in place), so SDPA runs without.
                "attention_dropout": 0.1 if backend == "local" else 0.0,
                "hidden_dropout": 0.1,
            },
            "data": {"seq_length": 512},
            "train": {"micro_batch_size": 2},
        },
    )


def saved_bytes(sections):
    """(bytes autograd keeps for one layer's backward, the planner's estimate of one layer)."""
    from megatron_ext.launch.memory import layer_activation_bytes
    from megatron_ext.run.builder import build_model

    cfg = from_dict(RunConfig, sections)
    (model,) = build_model(cfg, cuda=False)
    s, b, h = cfg.data.seq_length, cfg.train.micro_batch_size, cfg.model.hidden_size
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    hidden = torch.randn(s, b, h, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.decoder.layers[0](hidden, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(s))
    return sum(n for ptr, n in storages.items() if ptr not in params), layer_activation_bytes(cfg)


@pytest.mark.parametrize("backend", ["local", "sdpa"])
def test_the_activation_estimate_is_within_its_margin_of_what_a_layer_saves(backend):
    measured, estimate = run_distributed(saved_bytes, 1, sections=config(backend))[0]
    ratio = measured / (2 * estimate)  # fp32 here, 16-bit in the formula
    print(
        f"[memory] {backend}: saved {measured / 2**20:.2f} MiB, estimate x2 {2 * estimate / 2**20:.2f} MiB, {ratio:.2f}"
    )
    assert MARGIN[0] <= ratio <= MARGIN[1], ratio
