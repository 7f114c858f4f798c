"""ConSA's gates follow the window cost on natural text: the guard of the recipe rule ``gate_init: target``.

The start is trained here on the built-in corpus (Python docstrings, natural English with code
identifiers): 2 layers x 4 KV heads of dimension 16, 128-token samples, 400 steps. With W = 8 it
uses keys beyond the window (the window cost is measured, as is each unit's own: every unit alone on
SWA), and the units differ: in this start the cost concentrates in KV heads 1 to 3 of layer 0
(about 0.017 nats each, against 0.004 to 0.007 for the others).

From that start, 300 steps of mask learning with the gates started at the target (README, "ConSA
on natural text") must

* KV-head units, one full-attention unit per layer (rho = 0.75, per-layer constraint): give each
  unit an LM gradient that orders the units like their own window cost (Spearman >= 0.5 between
  the mean LM part of d loss / d log_alpha, negated, and the unit's window cost), and keep on full
  attention, in every layer whose units differ (largest cost >= 2 x smallest), a unit of the top
  group (cost >= half the layer's largest);
* layer units, one full-attention layer of 2 (rho = 0.5): keep the layer whose SWA alone costs
  more, its log_alpha at least 1 above the other's.

Not asserted: full polarization (``polarized_fraction``, a margin of 2 between the sides), which
this stage-1 length does not reach on natural text (README). The figures are printed (``-s``).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from tests.configs import merge

START = {
    "model": {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 4,
        "ffn_hidden_size": 128,
        "vocab_size": 2176,
        "normalization": "RMSNorm",
        "activation": "swiglu",
        "position_embedding": "rope",
        "qk_layernorm": True,
    },
    "data": {"kind": "default", "seq_length": 128},
    "train": {
        "micro_batch_size": 8,
        "global_batch_size": 8,
        "steps": 400,
        "lr": 5.0e-3,
        "min_lr": 5.0e-4,
        "warmup_steps": 20,
        "eval_interval": 0,
        "eval_steps": 8,
    },
    "checkpoint": {"save_interval": 0, "save_at_end": True},
    "logging": {"log_interval": 50, "tensorboard": False},
}
MASK_LEARNING = 300


def pretrain(run_dir, cache_dir):
    cfg = merge(START, {"data": {"cache_dir": cache_dir}})
    Trainer(from_dict(RunConfig, cfg), Path(run_dir), log=lambda line: None).run()


def learn_mask(run_dir, cache_dir, start, granularity, target, constraint):
    cfg = merge(
        START,
        {
            "data": {"cache_dir": cache_dir},
            "train": {
                "steps": MASK_LEARNING + 1,
                "lr": 5.0e-4,
                "min_lr": 5.0e-4,
                "warmup_steps": 0,
                "lr_schedule": "constant",
                "init_from": start,
                "seed": 1,
            },
            "checkpoint": {"save_at_end": False},
            "hybrid_attention": {
                "enabled": True,
                "method": "consa",
                "granularity": granularity,
                "window": 8,
                "target": target,
                "constraint": constraint,
                "gate_init": "target",
                "target_warmup_steps": 0,
                "mask_learning_steps": MASK_LEARNING,
                "unit_window_cost": True,
            },
        },
    )
    Trainer(from_dict(RunConfig, cfg), Path(run_dir), log=lambda line: None).run()
    record = json.loads((Path(run_dir) / "allocation.json").read_text())
    full = np.array([row["full_attention"] for row in record["layers"]], dtype=bool)
    log_alpha = np.array([row["log_alpha"] for row in record["layers"]])
    return full, log_alpha, record["diagnostics"]


def spearman(a, b):
    """Rank correlation (no ties expected among measured floats)."""
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("consa_natural")
    cache = str(root / "cache")
    run_distributed(pretrain, 1, None, run_dir=str(root / "start"), cache_dir=cache, timeout=900)
    return {"run": str(root / "start"), "cache": cache, "root": root}


def test_kv_head_gates_follow_the_window_cost(start):
    full, log_alpha, diagnostics = run_distributed(
        learn_mask,
        1,
        None,
        run_dir=str(start["root"] / "kv"),
        cache_dir=start["cache"],
        start=start["run"],
        granularity="kv_head",
        target=0.75,
        constraint="per_layer",
        timeout=900,
    )[0]
    cost = np.array(diagnostics["unit_window_cost"])
    lm_mean = np.array(diagnostics["gradients"]["lm_mean"])
    signal = spearman(cost.flatten(), -lm_mean.flatten())
    print(f"[natural] window cost {diagnostics['window_cost']:+.4f}; per unit {np.round(cost, 4).tolist()}")
    print(f"[natural] log_alpha {np.round(log_alpha, 2).tolist()}; polarized {diagnostics['polarized_fraction']:.2f}")
    print(f"[natural] Spearman(unit window cost, LM pull towards FA) {signal:.2f}")
    assert diagnostics["window_cost"] > 0.03  # the start uses keys beyond the window ...
    assert cost.max() > 2 * cost.min()  # ... and the units differ in how much
    assert signal >= 0.5
    assert full.sum(axis=1).tolist() == [1] * len(full)
    differing = [layer for layer, row in enumerate(cost) if row.max() >= 2 * row.min()]
    assert differing, "no layer whose units differ: the start does not test the allocation"
    for layer in differing:
        top = cost[layer] >= 0.5 * cost[layer].max()
        assert top[full[layer]].all(), f"layer {layer}: kept {np.flatnonzero(full[layer])}, top {np.flatnonzero(top)}"


def test_layer_gates_keep_the_layer_that_carries_the_window_cost(start):
    full, log_alpha, diagnostics = run_distributed(
        learn_mask,
        1,
        None,
        run_dir=str(start["root"] / "layer"),
        cache_dir=start["cache"],
        start=start["run"],
        granularity="layer",
        target=0.5,
        constraint="global",
        timeout=900,
    )[0]
    cost = np.array(diagnostics["unit_window_cost"])[:, 0]  # [layers]
    print(f"[natural] per-layer window cost {np.round(cost, 4).tolist()}; log_alpha {np.round(log_alpha, 2).tolist()}")
    assert cost.max() > 1.5 * cost.min()
    assert full[:, 0].tolist() == (cost == cost.max()).tolist()
    assert log_alpha[full].min() >= log_alpha[~full].max() + 1.0
