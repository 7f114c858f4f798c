"""MoE routing statistics: per-layer / per-modality load entropy, modality overlap (IoU), load
peaks, and the router losses, reduced to the same values at one rank and at DP = 2."""

import copy
from pathlib import Path

import torch

from megatron_ext.config import from_dict
from megatron_ext.moe.stats import routing_statistics
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

CONFIG = merge(
    TINY,
    {
        "model": {"num_layers": 3},
        "train": {"steps": 3},
        "moe": {
            "enabled": True,
            "num_experts": 8,
            "top_k": 2,
            "expert_ffn_hidden_size": 16,
            "first_k_dense": 1,
            "load_balancing": "aux_loss",
            "aux_loss_coeff": 0.01,
            "z_loss_coeff": 0.001,
        },
    },
)


def test_routing_statistics_of_planted_counts():
    counts = torch.zeros(2, 5, 4, dtype=torch.long)  # layers x (4 modalities + unknown) x experts
    counts[1, 0] = torch.tensor([10, 10, 0, 0])  # text on experts 0, 1
    counts[1, 1] = torch.tensor([0, 5, 5, 0])  # image on experts 1, 2
    out = routing_statistics(counts)
    assert set(out) == {"ne/1", "ne/text", "ne/image", "iou/text_image", "load_max_over_mean"}  # layer 0 idle
    assert out["ne/text"] == out["ne/image"] == 0.5  # two of four experts, evenly
    assert out["iou/text_image"] == 0.0  # top-25 % (one expert each): 0 and 1 (tie: lower index) vs 1 and 2
    assert abs(out["load_max_over_mean"] - 15 / 7.5) < 1e-12
    balanced = torch.zeros(1, 5, 4, dtype=torch.long)
    balanced[0, 0] = 3
    assert routing_statistics(balanced)["ne/0"] == 1.0


def train(run_dir, tensor=1):
    data = copy.deepcopy(CONFIG)
    Trainer(from_dict(RunConfig, data), Path(run_dir), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def test_router_losses_and_statistics_agree_at_one_rank_and_dp2(tmp_path):
    one = run_distributed(train, 1, None, run_dir=str(tmp_path / "one"))[0]
    two = run_distributed(train, 2, None, run_dir=str(tmp_path / "two"))[0]
    first = one[0]
    print("[moe stats] step 1:", {k: round(v, 5) for k, v in first.items() if k.startswith("moe/")})
    for key in (
        "moe/load_balancing_loss",
        "moe/z_loss",
        "moe/ne/1",
        "moe/ne/2",
        "moe/ne/text",
        "moe/load_max_over_mean",
    ):
        assert key in first, key
        assert abs(first[key] - two[0][key]) <= 1e-5 * abs(first[key]), (key, first[key], two[0][key])
    assert first["moe/load_balancing_loss"] >= 0.99  # E * sum f_i P_i >= 1, equality when balanced
    assert first["moe/z_loss"] > 0.0
    assert "moe/ne/0" not in first  # the dense first layer routes nothing


def train_with_rate_schedule(run_dir):
    data = copy.deepcopy(CONFIG)
    data["train"]["steps"] = 4
    data["routing"] = {"expert_bias": True, "bias_update_rate": 0.1, "bias_update_rate_schedule": [[3, 1.0e-6]]}
    Trainer(from_dict(RunConfig, data), Path(run_dir), log=lambda line: None).run()
    return [r["moe/bias_abs_mean"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


def test_bias_update_rate_follows_its_schedule(tmp_path):
    from megatron_ext.config import ConfigError
    from megatron_ext.moe.config import RoutingConfig

    routing = RoutingConfig(bias_update_rate=1e-4, bias_update_rate_schedule=[[100, 1e-5], [200, 1e-6]])
    assert [routing.bias_rate_at(s) for s in (1, 99, 100, 199, 200, 10**6)] == [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6]
    try:
        RoutingConfig(bias_update_rate_schedule=[[200, 1e-5], [100, 1e-6]])
    except ConfigError as err:
        assert "bias_update_rate_schedule" in str(err)
    else:
        raise AssertionError("a descending schedule was accepted")
    bias = run_distributed(train_with_rate_schedule, 1, None, run_dir=str(tmp_path))[0]
    print(f"[moe bias schedule] mean |bias| per step (rate 0.1, then 1e-6 from step 3): {bias}")
    assert 0.05 < bias[0] <= 0.1 + 1e-9  # one step of 0.1 (experts at the mean load do not move)
    assert all(abs(b - a) <= 1e-6 + 1e-9 for a, b in zip(bias[1:], bias[2:]))  # steps 3, 4: 1e-6 at most
