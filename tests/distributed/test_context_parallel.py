"""Context parallelism (CP) against one rank with the same weights, fp32.

Tolerance 1e-5 of the reference's largest magnitude. A chunk that sees one key too many or too few
(a wrong halo, a mask aligned top-left instead of bottom-right, a chunk's RoPE positions), or a loss
averaged per rank instead of over the group's tokens, moves results by far more.
"""

import pytest
import torch

from megatron_ext.models.kernels import sink_window_attention_reference, sliding_window_attention_reference
from megatron_ext.parallel import ParallelSizes
from megatron_ext.testing.distributed import run_distributed
from tests.distributed import cp_bodies
from tests.distributed.test_parity import assert_same_tensors
from tests.golden.cases import VOLATILE_KEYS

RTOL = 1e-5
T = 32  # CP=2: four chunks of L = 8


@pytest.mark.parametrize(
    "cp,window,sink",
    [(2, None, 0), (2, 1, 0), (2, 3, 0), (2, 8, 0), (2, 9, 0), (2, 13, 0), (2, 40, 0), (4, 11, 0), (2, 5, 3)],
    ids=["cp2-full", "cp2-w1", "cp2-w3", "cp2-w8=L", "cp2-w9=L+1", "cp2-w13", "cp2-w40>T", "cp4-w11", "cp2-w5-sink3"],
)
def test_attention_and_its_gradients_match_one_rank(cp, window, sink):
    """The CP kernels alone, W below, at and above a chunk's length (the halo then spans chunks on
    several ranks: at CP=4, L=4 and W=11 a halo reaches three chunks back), and LoZA's sink + recent."""
    g = torch.Generator().manual_seed(7)
    q, grad_out = torch.randn(2, 4, T, 8, generator=g), torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
    qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
    ref = (
        sink_window_attention_reference(qr, kr, vr, window, sink)
        if sink
        else sliding_window_attention_reference(qr, kr, vr, window or T)
    )
    ref.backward(grad_out)
    expected = {"out": ref.detach(), "dq": qr.grad, "dk": kr.grad, "dv": vr.grad}
    results = run_distributed(
        cp_bodies.attention_grads, cp, ParallelSizes(cp=cp), q=q, k=k, v=v, grad_out=grad_out, window=window, sink=sink
    )
    worst = 0.0
    for rank, result in enumerate(results):
        for name, full in expected.items():
            want = cp_bodies.zigzag(full, 2, cp, rank)
            # relative to the largest magnitude, at least 1 (at W = 1, dq is 0 up to rounding)
            diff = float((result[name] - want).abs().max()) / max(float(want.abs().max()), 1.0)
            assert diff <= RTOL, f"rank {rank} {name}: max relative difference {diff:.2e}"
            worst = max(worst, diff)
    row = 2 * 2 * 8 * 4  # bytes of one position of k (or v): batch x KV heads x head dim x fp32
    received = [r["bytes"] for r in results]
    print(f"[cp] CP={cp} W={window}: max relative difference {worst:.2e}; bytes received per rank {received}")
    if window is None or sink:
        assert all(
            b == {"full/forward": 2 * (cp - 1) * (T // cp) * row, "full/backward": 2 * (cp - 1) * (T // cp) * row}
            for b in received
        )
    elif cp == 2 and window <= T // 4 + 1:
        # one halo of W - 1 positions per rank comes from the other rank (the second one is local)
        assert all(
            b == {"window/forward": 2 * (window - 1) * row, "window/backward": 2 * (window - 1) * row} for b in received
        ), received


HYBRID = {
    "hybrid_attention": {"enabled": True, "granularity": "kv_head", "window": 5, "mask_learning_steps": 2},
    "looping": {"enabled": True},
}
WIDE = {**HYBRID, "hybrid_attention": {**HYBRID["hybrid_attention"], "window": 13}}
MODELS = {
    # sections, structure (see cp_bodies.set_structure)
    "full": ({}, {}),
    "swa-w5<L": (HYBRID, {"allocation": [[False, False], [False, False]]}),
    "swa-w13>L": (WIDE, {"allocation": [[False, False], [False, False]]}),
    "gated": (HYBRID, {"gates": [[0.3, 0.8], [0.5, 0.1]]}),
    "kv-head-mixed": (HYBRID, {"allocation": [[True, False], [False, True]]}),
    "looped": (HYBRID, {"allocation": [[True, False], [False, False]], "loop": (1, 1, [2])}),
    "loza-sink": (
        {
            "hybrid_attention": {
                "enabled": True,
                "method": "loza",
                "granularity": "layer",
                "window": 5,
                "sink_tokens": 3,
                "mask_learning_steps": 2,
            },
            "looping": {"enabled": True},
        },
        {"allocation": [[False], [True]], "loop": (1, 1, [1])},
    ),
}


def reference(sections, structure, num_microbatches=2):
    weights = run_distributed(cp_bodies.initial_weights, 1, sections=sections)[0]
    ref = run_distributed(
        cp_bodies.model_gradients,
        1,
        ParallelSizes(),
        sections=sections,
        weights=weights,
        structure=structure,
        num_microbatches=num_microbatches,
        entropy=True,
    )[0]
    return weights, ref


def assert_matches(results, ref, what):
    dp_size = results[0]["dp_size"]
    losses = [float(r["loss"]) for r in results]
    loss = sum(losses) / len(losses)  # every CP rank reports its DP rank's loss; the mean is the step's
    assert abs(loss - float(ref["loss"])) <= RTOL * abs(float(ref["loss"])), (
        f"{what}: loss {losses} vs {float(ref['loss'])}"
    )
    worst = assert_same_tensors(results[0]["grads"], ref["grads"], f"{what} grads")
    if dp_size == 1:  # the tracker's input before its DP average: every CP rank must agree with one rank
        for rank, result in enumerate(results):
            assert result["entropy"].keys() == ref["entropy"].keys()
            for layer, entropy in ref["entropy"].items():
                heads = result["entropy"][layer].shape[-1]  # this TP rank's query heads
                entropy = entropy[..., result["tp_rank"] * heads : (result["tp_rank"] + 1) * heads]
                diff = float((result["entropy"][layer] - entropy).abs().max())
                assert diff <= 1e-5, f"{what} rank {rank} layer {layer}: entropy off by {diff:.2e}"
    return worst


@pytest.mark.parametrize("model", list(MODELS))
def test_model_loss_and_gradients_match_one_rank(model):
    """GPT with our layers (RoPE on each chunk's positions, QK-norm, GQA, a loss mask that leaves
    the CP ranks unequal token counts): loss, every parameter's gradient and the SGT entropy."""
    sections, structure = MODELS[model]
    weights, ref = reference(sections, structure)
    cp = run_distributed(
        cp_bodies.model_gradients,
        2,
        ParallelSizes(cp=2),
        sections={**sections, "parallel": {"context": 2}},
        weights=weights,
        structure=structure,
        entropy=True,
    )
    worst = assert_matches(cp, ref, f"CP=2 {model}")
    print(f"[cp] CP=2 {model}: loss {float(cp[0]['loss']):.6f} vs {float(ref['loss']):.6f}, grads max rel {worst:.2e}")


DOCUMENT_MODELS = ["full", "kv-head-mixed", "gated", "looped", "loza-sink"]


@pytest.mark.parametrize("model", DOCUMENT_MODELS)
def test_document_masking_matches_one_rank(model):
    """Packed documents under document masking and per-document positions (EOD = 0, 3 boundaries per
    row): every chunk's queries stay within their documents over the gathered keys or the halo and
    rotate by their positions in them, as on one rank (loss, gradients, the SGT entropy of the last
    query's document); and the masking is really on (the loss differs from the unmasked one)."""
    sections, structure = MODELS[model]
    weights = run_distributed(cp_bodies.initial_weights, 1, sections=sections)[0]
    documents = {**sections, "data": {"kind": "default", "reset_attention_mask": True, "reset_position_ids": True}}
    common = dict(sections=documents, weights=weights, structure=structure, entropy=True)
    ref = run_distributed(cp_bodies.model_gradients, 1, ParallelSizes(), eod=0, **common)[0]
    cp = run_distributed(
        cp_bodies.model_gradients,
        2,
        ParallelSizes(cp=2),
        **{**common, "sections": {**documents, "parallel": {"context": 2}}},
        eod=0,
    )
    worst = assert_matches(cp, ref, f"CP=2 {model} with documents")
    unmasked = run_distributed(
        cp_bodies.model_gradients, 1, ParallelSizes(), eod=0, mask_documents=False, **{**common, "sections": sections}
    )[0]
    assert abs(float(unmasked["loss"]) - float(ref["loss"])) > 1e-4, "the document mask changed nothing"
    print(f"[cp] CP=2 {model} with documents: loss {float(cp[0]['loss']):.6f}, grads max rel {worst:.2e}")


@pytest.mark.parametrize("layout", ["cp2-tp2", "cp2-dp2"])
def test_context_parallel_composes_with_tensor_and_data_parallelism(layout):
    """Four ranks: CP=2 with TP=2 (sequence parallel; the looped layer's kept head on TP rank 1) or
    with DP=2 (two micro-batches per DP rank against four on one rank)."""
    sections, structure = MODELS["looped"]
    weights, ref = reference(sections, structure, num_microbatches=4)
    parallel = {"context": 2, "tensor": 2, "sequence_parallel": True} if layout == "cp2-tp2" else {"context": 2}
    sizes = ParallelSizes(cp=2, tp=2) if layout == "cp2-tp2" else ParallelSizes(cp=2)
    results = run_distributed(
        cp_bodies.model_gradients,
        4,
        sizes,
        sections={**sections, "parallel": parallel},
        weights=weights,
        structure=structure,
        num_microbatches=4 if layout == "cp2-tp2" else 2,
        entropy=True,
    )
    worst = assert_matches(results, ref, layout)
    print(f"[cp] {layout}: grads max rel {worst:.2e}")


EVERY_METHOD = {
    "hybrid_attention": {
        "enabled": True,
        "granularity": "kv_head",
        "window": 5,
        "target": 0.5,
        "mask_learning_steps": 3,
        "target_warmup_steps": 1,
        "hard_concrete": {"init_mean": 0.0},
    },
    "looping": {
        "enabled": True,
        "first_selection_step": 2,
        "window": 2,
        "top_k_layers": 1,
        "max_selected_layers": 1,
        "num_keep_heads": 1,
    },
    "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32},
    "routing": {"expert_bias": True},
    "elastic": {"enabled": True},
    "train": {"steps": 6},
}


def test_training_with_every_method_matches_one_rank(tmp_path):
    """The training loop at CP=2: ConSA mask learning (gated), binarization and the static hybrid,
    SGT loop growth from the entropy, elastic MoE with expert bias; every logged metric of CP=2 equals one rank's."""
    weights = run_distributed(cp_bodies.initial_weights, 1, sections=EVERY_METHOD)[0]
    ref = run_distributed(
        cp_bodies.train_metrics, 1, None, run_dir=str(tmp_path / "one"), sections=EVERY_METHOD, weights=weights
    )[0]
    cp = run_distributed(
        cp_bodies.train_metrics,
        2,
        None,
        run_dir=str(tmp_path / "cp2"),
        sections={**EVERY_METHOD, "parallel": {"context": 2}},
        weights=weights,
    )[0]
    assert [r["consa/stage"] for r in ref] == [1, 1, 1, 2, 2, 2], "mask learning, then the static hybrid"
    assert any(r["sgt/looped_layers"] > 0 for r in ref), "a loop must grow in the run"
    worst = 0.0
    assert [sorted(r) for r in cp] == [sorted(r) for r in ref]
    for a, b in zip(cp, ref):
        for key in sorted(set(b) - set(VOLATILE_KEYS)):
            mine, theirs = torch.tensor(a[key], dtype=torch.float64), torch.tensor(b[key], dtype=torch.float64)
            diff = float((mine - theirs).abs().max()) / max(float(theirs.abs().max()), 1e-6)
            assert diff <= RTOL, f"step {b['step']} {key}: CP=2 {a[key]} vs one rank {b[key]}"
            worst = max(worst, diff)
    print(
        f"[cp] training, every method: losses {[round(r['loss'], 6) for r in cp]} vs "
        f"{[round(r['loss'], 6) for r in ref]}; {len(ref[0])} metrics per step, max rel difference {worst:.2e}"
    )


def test_a_context_parallel_checkpoint_evaluates_alike_at_any_context_size(tmp_path):
    """Train at CP=2 with every method (the binarized allocation and grown loops are in the
    checkpoint), then evaluate at CP=1 and CP=2: both equal the validation loss the run logged."""
    sections = {
        **EVERY_METHOD,
        "train": {"steps": 6, "eval_interval": 6, "eval_steps": 2},
        "checkpoint": {"save_at_end": True},
    }
    run_dir = str(tmp_path / "run")
    last = run_distributed(cp_bodies.train_and_evaluate_config, 2, None, run_dir=run_dir, sections=sections, context=2)[
        0
    ]
    assert last["consa/stage"] == 2 and last["sgt/looped_layers"] >= 1
    logged = last["val/loss"]
    one = run_distributed(
        cp_bodies.evaluate_at, 1, ParallelSizes(), run_dir=run_dir, sections=sections, context=1, batches=2
    )[0]
    two = run_distributed(
        cp_bodies.evaluate_at, 2, ParallelSizes(cp=2), run_dir=run_dir, sections=sections, context=2, batches=2
    )
    print(f"[cp] checkpoint of a CP=2 run: logged val {logged:.6f}, at CP=1 {one:.6f}, at CP=2 {two[0]:.6f}")
    assert abs(one - logged) <= RTOL * abs(logged)
    assert all(abs(loss - logged) <= RTOL * abs(logged) for loss in two)
