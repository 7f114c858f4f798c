"""ConSA learns its allocation with every other capability on, at the smoke layout.

The planted task of ``test_consa_planted`` (copy at distance 31 with W = 8; KV heads 1 and 2 of
layer 0 carry it in the pretraining), now with a MoE second layer. Mask learning runs at TP = 2
with sequence parallelism and EP = 2, while elastic training samples depth, experts and top-k each
step, the expert bias balances the routers and SGT grows a loop. The gates see the LM gradient of
a different sub-network every step, summed over the tensor-parallel ranks that each hold half of
the KV heads; they must still keep exactly the planted pair, decided, and the learned allocation
must beat every other allocation with two full-attention units on the same weights.
"""

from pathlib import Path

from megatron_ext.consa.allocation import write_allocation
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.distributed.test_consa_planted import (
    FA_UNITS,
    KV_HEADS,
    LAYERS,
    PLANTED,
    WINDOW,
    _check_learned_is_best,
    _check_window_cost_shows_the_copy,
    _config,
    allocation_of,
)

MOE = {"moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 64, "first_k_dense": 1}}
TARGET = 1 - FA_UNITS / (LAYERS * KV_HEADS)


def pretrain_planted_moe(run_dir):
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_allocation(
        run_dir / "planted.json",
        allocation_of(PLANTED),
        granularity="kv_head",
        window=WINDOW,
        target=TARGET,
        method="planted",
    )
    cfg = _config(
        {
            **MOE,
            "hybrid_attention": {
                "enabled": True,
                "method": "static",
                "window": WINDOW,
                "allocation": str(run_dir / "planted.json"),
            },
        },
        1,
    )
    Trainer(cfg, run_dir, log=lambda line: None).run()
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def learn_mask_composed(run_dir, init_from):
    cfg = _config(
        {
            **MOE,
            "parallel": {"tensor": 2, "sequence_parallel": True, "expert": 2, "expert_tensor": 1},
            "routing": {"expert_bias": True, "bias_update_rate": 1.0e-3},
            "elastic": {"enabled": True},
            "looping": {
                "enabled": True,
                "method": "sgt",
                "first_selection_step": 20,
                "window": 20,
                "top_k_layers": 2,
                "max_selected_layers": 1,
                "max_loop_depth": 1,
                "num_keep_heads": 2,
            },
            "hybrid_attention": {
                "enabled": True,
                "method": "consa",
                "window": WINDOW,
                "target": TARGET,
                "constraint": "global",
                "mask_learning_steps": 150,
                "target_warmup_steps": 50,
            },
            "train": {"init_from": init_from, "steps": 160},
        },
        1,
    )
    Trainer(cfg, Path(run_dir), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def test_consa_keeps_the_planted_units_with_every_capability_on_at_tp2_ep2(tmp_path):
    pretrain = run_distributed(pretrain_planted_moe, 1, None, run_dir=str(tmp_path / "pretrain"), timeout=600)[0]
    assert pretrain[-1] < 0.1, f"the planted pretraining did not learn the copy: {pretrain}"
    run = tmp_path / "consa"
    records = run_distributed(
        learn_mask_composed, 2, None, run_dir=str(run), init_from=str(tmp_path / "pretrain"), timeout=900
    )[0]
    draws = {(r["elastic/depth"], r["elastic/num_experts"], r["elastic/topk"]) for r in records}
    assert len(draws) > 1, f"elastic training drew one sub-network only: {draws}"
    assert any(r["sgt/looped_layers"] for r in records), "SGT grew no loop"
    learned, log_alpha = _check_learned_is_best(run, "every capability on, TP=2 EP=2")
    assert learned == PLANTED, log_alpha
    _check_window_cost_shows_the_copy(run)
