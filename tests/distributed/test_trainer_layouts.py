"""The whole training loop at different layouts: same losses as one rank; resume at a new layout."""

import copy
from pathlib import Path

import pytest

from megatron_ext.config import from_dict
from megatron_ext.parallel import full_named_tensors
from megatron_ext.run import RunConfig
from megatron_ext.run.builder import build_model
from megatron_ext.testing.callbacks import PreemptAfter, StartFrom
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

BASE = merge(
    TINY,
    {
        "model": {"num_layers": 4},
        "train": {"micro_batch_size": 1, "steps": 4, "lr": 1.0e-2, "adam_eps": 1.0e-5, "warmup_steps": 1},
        "checkpoint": {"save_at_end": True},
    },
)


def initial_weights():
    return full_named_tensors(build_model(from_dict(RunConfig, BASE), cuda=False)[0])


def train(run_dir, overrides, weights, preempt_after=None):
    callbacks = [StartFrom(weights)] + ([PreemptAfter(preempt_after)] if preempt_after else [])
    cfg = from_dict(RunConfig, merge(BASE, overrides))
    summary = Trainer(cfg, Path(run_dir), callbacks, log=lambda line: None).run()
    assert summary.stopped_by_signal == (preempt_after is not None)
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


LAYOUTS = {
    "tp2": {"parallel": {"tensor": 2, "sequence_parallel": True}},
    "pp2": {"parallel": {"pipeline": 2}},
    "pp2-vpp2": {"parallel": {"pipeline": 2, "virtual_pipeline": 2}},
    "dp2-overlap": {"parallel": {"overlap_grad_reduce": True}},
    "recompute-full": {"train": {"recompute": "full"}, "parallel": {"pipeline": 2}},
}


@pytest.fixture(scope="module")
def weights():
    return run_distributed(initial_weights, 1)[0]


@pytest.fixture(scope="module")
def single_rank_losses(tmp_path_factory, weights):
    run_dir = str(tmp_path_factory.mktemp("ref"))
    return run_distributed(train, 1, None, run_dir=run_dir, overrides={}, weights=weights)[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(tmp_path, layout, weights, single_rank_losses):
    losses = run_distributed(train, 2, None, run_dir=str(tmp_path), overrides=LAYOUTS[layout], weights=weights)[0]
    print(f"[trainer] {layout}: {losses} vs {single_rank_losses}")
    assert len(losses) == len(single_rank_losses)
    for a, b in zip(losses, single_rank_losses):
        assert abs(a - b) <= 1e-4 * abs(b), f"{layout}: {losses} vs {single_rank_losses}"


def test_resume_at_another_layout_continues_the_run(tmp_path, weights, single_rank_losses):
    run_distributed(train, 2, None, run_dir=str(tmp_path), overrides=LAYOUTS["tp2"], weights=weights, preempt_after=2)
    losses = run_distributed(train, 2, None, run_dir=str(tmp_path), overrides=LAYOUTS["pp2"], weights=weights)[0]
    # Weights, Adam moments (resharded from TP=2 to PP=2) and the LR schedule all carried over.
    for a, b in zip(losses, single_rank_losses):
        assert abs(a - b) <= 1e-4 * abs(b), f"{losses} vs {single_rank_losses}"


ELASTIC_DEPTH = {  # every step drops some layers
    "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32},
    "routing": {"expert_bias": False},
    "elastic": {"enabled": True, "depth_full_prob": 0.0, "width_full_prob": 1.0, "topk_default_prob": 1.0},
    "train": {"steps": 6},
}


def merged(*overrides):
    """BASE with each of ``overrides`` (section -> values) applied in turn, as a RunConfig."""
    return from_dict(RunConfig, merge(BASE, *overrides))


def moe_weights(overrides=ELASTIC_DEPTH):
    return full_named_tensors(build_model(merged(overrides), cuda=False)[0])


def elastic_run(run_dir, overlap, weights):
    cfg = merged(ELASTIC_DEPTH, {"parallel": {"overlap_grad_reduce": overlap}})
    Trainer(cfg, Path(run_dir), [StartFrom(weights)], log=lambda line: None).run()
    return [(r["loss"], r["elastic/depth"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


def test_elastic_depth_with_overlapped_gradient_reduction_matches_the_synchronous_one(tmp_path):
    """Skipped layers report zero gradients, so overlapped DDP buckets complete; same losses."""
    weights = run_distributed(moe_weights, 1)[0]
    plain = run_distributed(elastic_run, 2, None, run_dir=str(tmp_path / "sync"), overlap=False, weights=weights)[0]
    overlapped = run_distributed(
        elastic_run, 2, None, run_dir=str(tmp_path / "overlap"), overlap=True, weights=weights
    )[0]
    print(f"[trainer] elastic depth, DP=2: synchronous {plain} | overlapped {overlapped}")
    assert [depth for _, depth in plain] == [depth for _, depth in overlapped]
    assert all(depth < 4 for _, depth in plain)  # every step skipped at least one layer
    for (a, _), (b, _) in zip(overlapped, plain):
        assert abs(a - b) <= 1e-6 * abs(b), f"{overlapped} vs {plain}"


def _recompute_run(run_dir, modules):
    from tests.golden.cases import case_configs, run_case

    config = copy.deepcopy(case_configs()["tp2"])  # TP=2 + SP with every capability on
    config["train"].update(steps=3, eval_interval=0)
    if modules is not None:
        config["train"].update(recompute="selective", recompute_modules=modules)
    return [(r["loss"], r["grad_norm"]) for r in run_case(config, run_dir)]


def test_selective_recompute_of_norms_and_moe_through_the_trainer_matches_no_recompute(tmp_path):
    """``layernorm`` recompute goes through Megatron's CheckpointWithoutOutput, which raised
    NameError without Transformer Engine in megatron-core 0.16.1 (fixed in megatron_ext.compat)."""
    plain = run_distributed(_recompute_run, 2, None, run_dir=str(tmp_path / "plain"), modules=None)[0]
    recomputed = run_distributed(
        _recompute_run,
        2,
        None,
        run_dir=str(tmp_path / "recompute"),
        modules=["core_attn", "layernorm", "moe", "shared_experts"],
    )[0]
    print(f"[trainer] selective recompute: {recomputed} vs {plain}")
    assert recomputed[0][0] == plain[0][0]  # the same forward
    for (loss, grad), (loss_ref, grad_ref) in zip(recomputed, plain):
        assert abs(loss - loss_ref) <= 1e-6 * loss_ref and abs(grad - grad_ref) <= 1e-6 * grad_ref


DENSE_FIRST = {  # the first pipeline stage holds only dense layers: no router there
    "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "first_k_dense": 2},
    "routing": {"expert_bias": True, "bias_update_rate": 1.0e-2},
    "train": {"steps": 4},
}


def dense_first_run(run_dir, weights, pipeline, elastic):
    cfg = merged(
        DENSE_FIRST,
        {
            "parallel": {"pipeline": pipeline},
            "elastic": {"enabled": elastic, "depth_full_prob": 0.5, "width_full_prob": 0.5, "topk_default_prob": 0.5},
        },
    )
    Trainer(cfg, Path(run_dir), [StartFrom(weights)], log=lambda line: None).run()
    return [
        (r["loss"], r["moe/load_cv"], r.get("elastic/depth")) for r in read_metrics(Path(run_dir) / "metrics.jsonl")
    ]


@pytest.mark.parametrize("elastic", [False, True], ids=["plain", "elastic"])
def test_dense_first_layers_under_pipeline_parallelism_match_one_rank(tmp_path, elastic):
    """PP=2 with moe.first_k_dense=2 of 4 layers: the router-less first stage joins the load and bias
    reductions (no hang), and losses and load statistics equal one rank's."""
    weights = run_distributed(moe_weights, 1, overrides=DENSE_FIRST)[0]
    one = run_distributed(
        dense_first_run, 1, None, run_dir=str(tmp_path / "one"), weights=weights, pipeline=1, elastic=elastic
    )[0]
    pp2 = run_distributed(
        dense_first_run, 2, None, run_dir=str(tmp_path / "pp2"), weights=weights, pipeline=2, elastic=elastic
    )[0]
    print(f"[trainer] dense-first MoE, elastic={elastic}: PP=2 {pp2} | one rank {one}")
    assert len(pp2) == len(one) == 4
    for (loss, cv, depth), (loss_ref, cv_ref, depth_ref) in zip(pp2, one):
        assert depth == depth_ref
        assert abs(loss - loss_ref) <= 1e-5 * loss_ref and abs(cv - cv_ref) <= 1e-4 * max(cv_ref, 1e-6)


def capacity_run(run_dir, width_full_prob):
    cfg = merged(
        {
            "moe": {
                "enabled": True,
                "num_experts": 8,
                "top_k": 2,
                "expert_ffn_hidden_size": 32,
                "capacity_factor": 1.5,
            },
            "routing": {"expert_bias": False},
            "elastic": {
                "enabled": True,
                "depth_full_prob": 1.0,
                "width_full_prob": width_full_prob,
                "topk_default_prob": 1.0,
            },
            "train": {"steps": 4},
        }
    )
    Trainer(cfg, Path(run_dir), log=lambda line: None).run()
    return [
        (r["elastic/num_experts"], r["moe/dropped_fraction"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl")
    ]


def test_capacity_of_a_width_restricted_step_counts_its_active_experts(tmp_path):
    """Capacity factor 1.5 over the 4 active of 8 experts: Megatron's capacity counts all 8, so at
    least 25% of the assignments would be dropped; over the active experts only imbalance drops."""
    half = run_distributed(capacity_run, 1, None, run_dir=str(tmp_path / "half"), width_full_prob=0.0)[0]
    full = run_distributed(capacity_run, 1, None, run_dir=str(tmp_path / "full"), width_full_prob=1.0)[0]
    print(f"[trainer] capacity 1.5: half width (experts, dropped) {half} | full width {full}")
    assert all(experts == 4 for experts, _ in half) and all(experts == 8 for experts, _ in full)
    assert all(0.0 <= dropped < 0.2 for _, dropped in half + full)
