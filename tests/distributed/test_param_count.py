"""Meta-device parameter counts of the Qwen3-shaped configs against the published figures."""

import pytest

from megatron_ext.run import load_config
from megatron_ext.run.param_count import count_parameters
from megatron_ext.testing.distributed import run_distributed


def count(config_path):
    return count_parameters(load_config(config_path)).as_dict()


@pytest.mark.parametrize(
    "config,total,non_embedding",
    [("configs/qwen3_0p6b.yaml", 0.6e9, 0.44e9), ("configs/qwen3_1p7b.yaml", 1.7e9, 1.4e9)],
    ids=["qwen3-0.6b", "qwen3-1.7b"],
)
def test_qwen3_shapes_match_published_counts(config, total, non_embedding):
    report = run_distributed(count, 1, config_path=config)[0]
    print(f"[params] {config}: {report}")
    assert abs(report["total"] - total) / total <= 0.02
    assert abs(report["non_embedding"] - non_embedding) / non_embedding <= 0.02
    assert report["embedding"] == 151936 * load_config(config).model.hidden_size  # tied: counted once
    assert report["active"] == report["total"]  # dense


def test_moe_active_parameters_count_top_k_of_routed_experts():
    report = run_distributed(count, 1, config_path="configs/smoke.yaml")[0]
    cfg = load_config("configs/smoke.yaml")
    routed = report["routed_experts"]
    assert routed > 0
    assert report["active"] == report["total"] - routed + routed * cfg.moe.top_k // cfg.moe.num_experts


def test_ernie_ablation_shape_matches_paper_counts():
    """454M active / 3.2B total (METHODS.md section 3), within 5%."""
    report = run_distributed(count, 1, config_path="configs/ernie_moe_ablation.yaml")[0]
    print(f"[params] ernie ablation: {report}")
    assert abs(report["active"] - 454e6) / 454e6 <= 0.05
    assert abs(report["total"] - 3.2e9) / 3.2e9 <= 0.05
    assert report["active"] / report["total"] < 0.15


def test_ultra_sparse_recipe_activates_under_3_percent_and_fits_its_layout():
    from megatron_ext.run import check_run

    report = run_distributed(count, 1, config_path="configs/ultra_sparse_moe.yaml")[0]
    print(f"[params] ultra-sparse: {report}, active {report['active'] / report['total']:.2%}")
    assert report["active"] / report["total"] < 0.03
    check_run(load_config("configs/ultra_sparse_moe.yaml"), 64, cuda=True)  # PP 4 x DP 16 (EP 16)
