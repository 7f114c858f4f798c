"""Parallel layouts against the single-rank model with the same full weights.

Tolerance: 1e-5 of the reference's largest magnitude, in fp32. A wrong reduction (a sum where a
mean belongs, a missing all-reduce, a misplaced shard) moves results by O(1) relative, far above.
"""

import pytest
import torch

from megatron_ext.parallel import ParallelSizes
from megatron_ext.testing.distributed import run_distributed
from tests.distributed import bodies

RTOL = 1e-5


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def assert_same_tensors(actual: dict, expected: dict, what: str, rtol: float = RTOL) -> float:
    assert actual.keys() == expected.keys(), f"{what}: keys differ: {sorted(actual.keys() ^ expected.keys())}"
    worst = 0.0
    for name in expected:
        assert actual[name].shape == expected[name].shape, f"{what} {name}: shape"
        diff = max_rel_diff(actual[name], expected[name])
        assert diff <= rtol, f"{what} {name}: max relative difference {diff:.2e} > {rtol:.0e}"
        worst = max(worst, diff)
    print(f"[parity] {what}: max relative difference {worst:.2e} over {len(expected)} tensors")
    return worst


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_tensor_parallel_matches_single_rank(sequence_parallel):
    weights = run_distributed(bodies.initial_weights, 1)[0]
    kwargs = dict(global_indices=[0], weights=weights)
    ref = run_distributed(bodies.ddp_gradients, 1, **kwargs)[0]
    tp = run_distributed(bodies.ddp_gradients, 2, ParallelSizes(tp=2), sequence_parallel=sequence_parallel, **kwargs)
    for rank_result in tp:
        assert max_rel_diff(rank_result["losses"][0], ref["losses"][0]) <= RTOL
    assert_same_tensors(tp[0]["grads"], ref["grads"], f"TP=2{'+SP' if sequence_parallel else ''} grads")


@pytest.mark.parametrize(
    "sizes,num_experts",
    [(ParallelSizes(pp=2), None), (ParallelSizes(tp=2), None), (ParallelSizes(ep=2), 4)],
    ids=["pp2-1f1b", "tp2-sp", "ep2-moe"],
)
def test_training_steps_match_single_rank(sizes, num_experts):
    """3 AdamW steps with global-norm clipping (clip 0.5 is active), 4 micro-batches per step.

    Covers the pipeline schedule (1F1B at PP=2), and the optimizer's global gradient norm over
    the model-parallel group (TP duplicates counted once) and over the expert group (EP).
    """
    weights = run_distributed(bodies.initial_weights, 1, num_layers=4, num_experts=num_experts)[0]
    kwargs = dict(steps=3, num_microbatches=4, num_layers=4, num_experts=num_experts, weights=weights)
    ref = run_distributed(bodies.train_losses, 1, **kwargs)[0]
    if sizes.ep > 1:  # EP lives inside DP: two ranks, 2 micro-batches each, same global batch
        kwargs["num_microbatches"] = 2
    par = run_distributed(bodies.train_losses, 2, sizes, **kwargs)
    assert par[0]["losses"] == par[1]["losses"], "every rank must report the same loss"
    for step, (a, b) in enumerate(zip(par[0]["losses"], ref["losses"])):
        assert abs(a - b) <= RTOL * abs(b), f"step {step}: {sizes} loss {a} != single-rank loss {b}"
    assert ref["losses"][-1] < ref["losses"][0], "the optimizer must make progress"
    assert all(n > 0.5 for n in ref["grad_norms"]), "clipping must be active for this test to bite"
    for a, b in zip(par[0]["grad_norms"], ref["grad_norms"]):
        assert abs(a - b) <= RTOL * b, f"grad norm {a} != single-rank {b}"
    # Adam divides by sqrt(v): rounding differences of another summation order grow by a few
    # times per step, so weights after 3 steps get 1e-4 (a wrong reduction is off by O(1)).
    assert_same_tensors(par[0]["weights"], ref["weights"], f"{sizes} weights after 3 steps", rtol=1e-4)
    print(f"[parity] {sizes} losses {par[0]['losses']} vs single rank {ref['losses']}")
    # Megatron's param groups: no weight decay exactly for norms (1-D) and biases.
    assert ref["no_decay"] and all("norm" in n or n.endswith("bias") for n in ref["no_decay"])


def test_data_parallel_gradients_equal_full_batch_gradient():
    weights = run_distributed(bodies.initial_weights, 1)[0]
    kwargs = dict(global_indices=[0, 1, 2, 3], weights=weights)
    ref = run_distributed(bodies.ddp_gradients, 1, **kwargs)[0]
    dp = run_distributed(bodies.ddp_gradients, 2, **kwargs)
    for name, grad in dp[0]["local_grads"].items():
        assert torch.equal(grad, dp[1]["local_grads"][name]), f"{name}: DP ranks disagree after reduction"
    assert_same_tensors(dp[0]["grads"], ref["grads"], "DP=2 grads")


@pytest.mark.parametrize("shared_expert", [False, True], ids=["routed", "shared"])
def test_expert_parallel_alltoall_matches_single_rank(shared_expert):
    model = dict(num_experts=4, shared_expert=shared_expert)
    weights = run_distributed(bodies.initial_weights, 1, **model)[0]
    # One micro-batch per rank; EP=2 exchanges tokens between the two.
    kwargs = dict(global_indices=[0, 1], weights=weights, **model)
    ref = run_distributed(bodies.ddp_gradients, 1, **kwargs)[0]
    ep = run_distributed(bodies.ddp_gradients, 2, ParallelSizes(ep=2), **kwargs)
    for rank in range(2):  # rank r's output is the reference's micro-batch r
        assert max_rel_diff(ep[rank]["losses"][0], ref["losses"][rank]) <= RTOL
    assert any(".local_experts.3." in name for name in ep[0]["grads"])
    assert_same_tensors(ep[0]["grads"], ref["grads"], f"EP=2 grads ({'shared' if shared_expert else 'routed'})")


def test_dist_checkpoint_saved_at_tp2_loads_at_pp2_and_tp1(tmp_path):
    (tmp_path / "ckpt").mkdir()
    ckpt = str(tmp_path / "ckpt")
    saved = run_distributed(bodies.save_checkpoint, 2, ParallelSizes(tp=2), ckpt_dir=ckpt)[0]
    for world, sizes in ((2, ParallelSizes(pp=2)), (1, ParallelSizes())):
        loaded = run_distributed(bodies.load_checkpoint, world, sizes, ckpt_dir=ckpt)[0]
        assert any(not torch.equal(loaded["before"][n], saved[n]) for n in saved), "init must differ"
        assert loaded["after"].keys() == saved.keys()
        for name in saved:
            assert torch.equal(loaded["after"][name], saved[name]), f"{sizes}: {name} differs"


def test_dist_checkpoint_resharding_of_experts(tmp_path):
    (tmp_path / "moe_ckpt").mkdir()
    ckpt = str(tmp_path / "moe_ckpt")
    saved = run_distributed(bodies.save_checkpoint, 2, ParallelSizes(ep=2), ckpt_dir=ckpt, num_experts=4)[0]
    loaded = run_distributed(bodies.load_checkpoint, 1, ckpt_dir=ckpt, num_experts=4)[0]["after"]
    assert loaded.keys() == saved.keys()
    for name in saved:
        assert torch.equal(loaded[name], saved[name]), name


def test_rng_tracker_streams_follow_megatron_layout():
    tp2 = run_distributed(bodies.dropout_masks, 2, ParallelSizes(tp=2))
    ep2 = run_distributed(bodies.dropout_masks, 2, ParallelSizes(ep=2))
    again = run_distributed(bodies.dropout_masks, 2, ParallelSizes(tp=2))
    # Default (data-parallel seed) stream: identical on all ranks of a model-parallel group.
    assert torch.equal(tp2[0]["default"], tp2[1]["default"])
    assert torch.equal(tp2[0]["default_after"], tp2[1]["default_after"])
    # Tensor-parallel stream: differs across TP ranks, identical across DP ranks.
    assert not torch.equal(tp2[0]["model-parallel-rng"], tp2[1]["model-parallel-rng"])
    assert torch.equal(ep2[0]["model-parallel-rng"], ep2[1]["model-parallel-rng"])
    # Expert stream: differs across EP ranks.
    assert not torch.equal(ep2[0]["expert-parallel-rng"], ep2[1]["expert-parallel-rng"])
    # Forking does not disturb the default stream, and the streams differ from each other.
    assert not torch.equal(tp2[0]["default"], tp2[0]["model-parallel-rng"])
    assert not torch.equal(tp2[0]["default"], tp2[0]["default_after"])
    # Reproducible: the same seed gives the same masks.
    for key in tp2[0]:
        assert torch.equal(tp2[0][key], again[0][key]), key


def test_tensor_sequence_and_expert_parallel_together_match_single_rank():
    """TP=2 with sequence parallelism and EP=2 (ETP=1) on the same two ranks, MoE with shared expert."""
    model = dict(num_experts=4, shared_expert=True)
    weights = run_distributed(bodies.initial_weights, 1, **model)[0]
    kwargs = dict(global_indices=[0], weights=weights, **model)
    ref = run_distributed(bodies.ddp_gradients, 1, **kwargs)[0]
    both = run_distributed(bodies.ddp_gradients, 2, ParallelSizes(tp=2, ep=2, etp=1), **kwargs)
    assert max_rel_diff(both[0]["losses"][0], ref["losses"][0]) <= RTOL
    assert_same_tensors(both[0]["grads"], ref["grads"], "TP=2+SP, EP=2 grads")
