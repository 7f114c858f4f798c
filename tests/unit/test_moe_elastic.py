"""Elastic sub-network sampling, the MoE config sections, and the expert-load formulas (one process)."""

import math
from collections import Counter

import pytest
import torch

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.moe.config import ElasticConfig, RoutingConfig
from megatron_ext.moe.elastic import ElasticSampler, SubNetwork
from megatron_ext.moe.stats import layer_metrics, load_cv, normalized_entropy, top_experts, top_experts_iou
from megatron_ext.run import RunConfig

# The paper's ablation shape: 16 layers, 64 experts, top-8.
LAYERS, EXPERTS, TOP_K = 16, 64, 8


def sampler(seed=1234, **overrides):
    return ElasticSampler(ElasticConfig(enabled=True, **overrides), LAYERS, EXPERTS, TOP_K, seed)


def test_same_seed_and_step_give_the_same_subnetwork_on_separate_instances():
    rank0, rank1 = sampler(), sampler()
    torch.manual_seed(0)  # the global RNG streams must not matter
    first = [rank0.sample(step) for step in range(1, 1001)]
    torch.manual_seed(1)
    second = [rank1.sample(step) for step in range(1, 1001)]
    assert first == second
    # Stateless: a resumed run (a new instance, any order of steps) draws the same sub-networks.
    resumed = sampler()
    assert [resumed.sample(step) for step in range(1000, 0, -1)] == first[::-1]
    assert sampler(seed=1235).sample(1) != first[0] or sampler(seed=1235).sample(2) != first[1]
    assert sampler(seed_offset=1).sample(1) == sampler(seed=1235).sample(1)


def test_draw_frequencies_match_the_configured_probabilities():
    s = sampler()
    steps = 4000
    subs = [s.sample(step) for step in range(steps)]
    full_depth = sum(len(x.layers) == LAYERS for x in subs) / steps
    full_width = sum(x.experts is None for x in subs) / steps
    default_k = sum(x.top_k == TOP_K for x in subs) / steps
    # binomial standard deviation at p = 0.8, n = 4000 is 0.0063: 0.03 is ~5 sigma
    assert abs(full_depth - 0.75) < 0.03
    assert abs(full_width - 0.8) < 0.03
    assert abs(default_k - 0.8) < 0.03
    reduced_k = Counter(x.top_k for x in subs if x.top_k != TOP_K)
    assert set(reduced_k) == set(range(1, TOP_K)), "a reduced k is uniform over [1, top_k)"
    depths = Counter(len(x.layers) for x in subs if len(x.layers) != LAYERS)
    assert set(depths) == set(range(1, LAYERS)), "a reduced depth is uniform over [min, L - 1]"


def test_subnetworks_are_well_formed():
    s = sampler(
        depth_full_prob=0.0,
        width_full_prob=0.0,
        topk_default_prob=0.0,
        depth_min_layers=4,
        width_num_experts=16,
        topk_range=[2, 5],
    )
    for step in range(500):
        sub = s.sample(step)
        assert 4 <= len(sub.layers) <= LAYERS - 1
        assert list(sub.layers) == sorted(set(sub.layers)) and all(0 <= i < LAYERS for i in sub.layers)
        assert len(sub.experts) == 16 and list(sub.experts) == sorted(set(sub.experts))
        assert all(0 <= e < EXPERTS for e in sub.experts)
        assert 2 <= sub.top_k < 5
    default_width = sampler(width_full_prob=0.0).sample(3)
    assert len(default_width.experts) == EXPERTS // 2
    never = sampler(depth_full_prob=1.0, width_full_prob=1.0, topk_default_prob=1.0)
    assert all(never.sample(step) == never.full() for step in range(100))
    assert never.full().is_full(LAYERS, TOP_K)
    tiny = ElasticSampler(ElasticConfig(enabled=True, depth_full_prob=0.0), 2, 4, 2, seed=0)
    assert all(len(tiny.sample(step).layers) == 1 for step in range(50)), "never empty"


@pytest.mark.parametrize(
    "field,value",
    [
        ("depth_full_prob", 1.5),
        ("width_full_prob", -0.1),
        ("topk_default_prob", "high"),
        ("depth_min_layers", 0),
        ("width_num_experts", 0),
        ("topk_range", [3, 3]),
        ("topk_range", [0, 2]),
        ("topk_range", [1]),
        ("seed_offset", -1),
        ("enabled", "yes"),
    ],
)
def test_elastic_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^invalid configuration:\n  - elastic.{field}="):
        from_dict(RunConfig, {"elastic": {field: value}})  # the loader names the YAML path
    with pytest.raises(ValueError, match=f"{field}="):
        ElasticConfig(**{field: value})


def test_elastic_config_checks_against_the_model_shape():
    assert ElasticConfig().problems_with_model(LAYERS, EXPERTS, TOP_K) == []
    problems = ElasticConfig(depth_min_layers=16, width_num_experts=4, topk_range=[2, 9]).problems_with_model(
        LAYERS, EXPERTS, TOP_K
    )
    assert len(problems) == 3
    assert "depth_min_layers=16" in problems[0] and "width_num_experts=4" in problems[1]
    assert "topk_range=[2, 9)" in problems[2]
    with pytest.raises(ValueError, match="depth_min_layers"):
        ElasticSampler(ElasticConfig(enabled=True), num_layers=1, num_experts=8, top_k=2, seed=0)
    with pytest.raises(ValueError, match="topk_range"):  # top-1 models have no smaller k
        ElasticSampler(ElasticConfig(enabled=True), num_layers=4, num_experts=8, top_k=1, seed=0)
    ElasticSampler(ElasticConfig(enabled=True, topk_default_prob=1.0), num_layers=4, num_experts=8, top_k=1, seed=0)


def test_routing_config_validation():
    for values, field in (
        ({"mode": "isolated"}, "mode"),
        ({"isolated_modalities": ["text", "smell"]}, "isolated_modalities"),
        ({"bias_update_rate": 0.0}, "bias_update_rate"),
    ):
        with pytest.raises(ConfigError, match=f"routing.{field}="):
            from_dict(RunConfig, {"routing": values})
        with pytest.raises(ValueError, match=f"^invalid configuration:\n  - {field}="):
            RoutingConfig(**values)
    assert RoutingConfig().problems_with_model(8, 2, "sigmoid") == []
    assert "score_function" in RoutingConfig().problems_with_model(8, 2, "softmax")[0]
    isolated = RoutingConfig(mode="modality_isolated", expert_bias=False)
    assert isolated.partition_modalities == ("text", "image", "video", "audio")
    assert "divisible" in isolated.problems_with_model(6, 1, "softmax")[0]
    assert "smaller than moe.top_k" in isolated.problems_with_model(8, 4, "softmax")[0]


def test_load_statistics_on_hand_made_counts():
    balanced = torch.tensor([5.0, 5.0, 5.0, 5.0])
    one_hot = torch.tensor([4.0, 0.0, 0.0, 0.0])
    half = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert float(load_cv(balanced)) == 0.0
    # mean 1, population std sqrt((9 + 1 + 1 + 1) / 4) = sqrt(3)
    assert math.isclose(float(load_cv(one_hot)), math.sqrt(3.0))
    assert math.isclose(float(load_cv(half)), 1.0)  # mean 0.5, std 0.5
    assert float(load_cv(torch.zeros(4))) == 0.0
    assert math.isclose(float(normalized_entropy(balanced)), 1.0)
    assert float(normalized_entropy(one_hot)) == 0.0
    assert math.isclose(float(normalized_entropy(half)), math.log(2) / math.log(4))  # 0.5
    rows = torch.stack([balanced, one_hot])  # per layer
    assert torch.allclose(load_cv(rows), torch.tensor([0.0, math.sqrt(3.0)], dtype=torch.float64))
    metrics = layer_metrics(torch.stack([balanced, one_hot, torch.zeros(4)]))  # the empty layer is left out
    assert math.isclose(metrics["load_cv"], math.sqrt(3.0) / 2) and math.isclose(metrics["load_ne"], 0.5)
    assert layer_metrics(torch.stack([half]), active_experts=[0, 1]) == {"load_cv": 0.0, "load_ne": 1.0}


def test_top_quarter_iou():
    a = torch.tensor([9.0, 8.0, 0, 0, 0, 0, 0, 1])  # top 2 of 8: {0, 1}
    b = torch.tensor([0.0, 9.0, 8.0, 0, 0, 0, 0, 0])  # {1, 2}
    assert top_experts(a) == [0, 1] and top_experts(b) == [1, 2]
    assert math.isclose(top_experts_iou(a, b), 1 / 3)
    assert top_experts_iou(a, a) == 1.0
    c = torch.tensor([0.0, 0, 0, 0, 0, 0, 5, 7])
    assert top_experts_iou(a, c) == 0.0
    assert top_experts(torch.zeros(8)) == [0, 1], "ties go to the lower index"
    assert top_experts(torch.arange(5.0)) == [3, 4], "ceil(5 / 4) = 2 experts"


def test_subnetwork_is_hashable_and_comparable():
    sub = SubNetwork(layers=(0, 2), experts=(1, 3), top_k=1)
    assert sub == SubNetwork(layers=(0, 2), experts=(1, 3), top_k=1)
    assert len({sub, SubNetwork(layers=(0, 2), experts=(1, 3), top_k=1)}) == 1


def _moe_run(**sections):
    data = {
        "model": {"num_layers": 2},
        "moe": {"enabled": True, "num_experts": 8, "top_k": 2},
        "train": {"global_batch_size": 8, "micro_batch_size": 1},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(RunConfig, data)


def test_moe_layouts_and_routings_that_cannot_run_are_refused_before_work():
    from megatron_ext.run import check_run

    with pytest.raises(ConfigError, match="fails on gloo.*parallel.expert_tensor: 1"):
        check_run(_moe_run(parallel={"tensor": 2, "expert": 2, "sequence_parallel": True}), 4, cuda=False)
    check_run(
        _moe_run(parallel={"tensor": 2, "expert": 2, "expert_tensor": 1, "sequence_parallel": True}), 4, cuda=False
    )
    check_run(_moe_run(parallel={"tensor": 2, "expert": 2, "sequence_parallel": True}), 4, cuda=True)
    softmax_top1 = {"top_k": 1, "score_function": "softmax"}
    with pytest.raises(ConfigError, match="moe.router_pre_softmax: true"):
        check_run(_moe_run(moe=softmax_top1, routing={"expert_bias": False}), 1, cuda=False)
    check_run(_moe_run(moe={**softmax_top1, "router_pre_softmax": True}, routing={"expert_bias": False}), 1, cuda=False)


def test_extraction_keeps_the_modality_partitions_of_the_isolated_baseline_equal():
    from megatron_ext.training.extract import check_subnetwork

    cfg = _moe_run(
        routing={"mode": "modality_isolated", "isolated_modalities": ["text", "image"], "expert_bias": False},
        moe={"score_function": "softmax"},
    )
    check_subnetwork(cfg, SubNetwork((0, 1), (0, 1, 4, 5), 2))  # two of each partition of 4
    with pytest.raises(ValueError, match=r"keep \{'text': 3, 'image': 1\} experts of the modality partitions"):
        check_subnetwork(cfg, SubNetwork((0, 1), (0, 1, 2, 4), 2))
