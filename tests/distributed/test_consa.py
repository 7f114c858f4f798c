"""ConSA end to end: gated layers under TP / PP, static fast path vs reference, the controller
reaching its target through the real training loop, binarization, allocation.json, resume."""

import copy
import json
from pathlib import Path

import pytest
import torch

from megatron_ext.capability import Callback
from megatron_ext.config import from_dict
from megatron_ext.consa.attention import HybridCoreAttention
from megatron_ext.models.kernels import causal_attention, sliding_window_attention_reference
from megatron_ext.parallel import ParallelSizes, destroy_parallel_state, full_named_tensors, initialize_parallel_state
from megatron_ext.run import RunConfig
from megatron_ext.run.builder import build_model
from megatron_ext.testing.callbacks import PreemptAfter, StartFrom
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics

BASE = {
    "model": {
        "num_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_query_groups": 4,
        "ffn_hidden_size": 64,
        "vocab_size": 128,
    },
    "data": {"seq_length": 32},
    "train": {"micro_batch_size": 2, "global_batch_size": 4, "steps": 6, "lr": 3.0e-3, "adam_eps": 1.0e-5},
    "checkpoint": {"save_at_end": False},
    "logging": {"tensorboard": False},
    "hybrid_attention": {
        "enabled": True,
        "method": "consa",
        "granularity": "kv_head",
        "window": 8,
        "target": 0.5,
        "constraint": "per_layer",
        "mask_learning_steps": 100,
        "gate_lr": 0.1,
    },
}


def config(**sections):
    data = copy.deepcopy(BASE)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_dict(RunConfig, data)


class RecordGates(Callback):
    """Records the z every local hybrid layer uses in its training forwards: ``(layer, z)``. Runs
    after the ConSA callback, which hands the layers their gates at every step's start."""

    def __init__(self):
        self.used = []

    def on_step_begin(self, ctx):
        from megatron_ext.consa.callback import LayerGate

        for chunk in ctx.model:
            for m in chunk.modules():
                if isinstance(m, HybridCoreAttention) and isinstance(m._gate, LayerGate):
                    m.set_gated(self._recording(m._gate))

    def _recording(self, gate):
        def use(training):
            z = gate(training)
            if training:
                self.used.append((gate.layer, z.detach().clone()))
            return z

        return use


def initial_weights():
    return full_named_tensors(build_model(config(), cuda=False)[0])


def train(run_dir, sections, weights=None, preempt_after=None):
    recorder = RecordGates()
    callbacks = (
        ([StartFrom(weights)] if weights is not None else [])
        + ([PreemptAfter(preempt_after)] if preempt_after else [])
        + [recorder]
    )
    trainer = Trainer(config(**sections), Path(run_dir), callbacks, log=lambda line: None)
    trainer.run()
    consa = trainer.callbacks[0]
    return {
        "gates_used": recorder.used,
        "metrics": read_metrics(Path(run_dir) / "metrics.jsonl"),
        "log_alpha": consa.gates.log_alpha.detach().clone() if consa.gates is not None else None,
        "gate_grad": getattr(consa, "last_lm_grad", None),
        "allocation": consa.allocation,
    }


@pytest.fixture(scope="module")
def weights():
    return run_distributed(initial_weights, 1)[0]


# Gates started half open: from the default init (log_alpha 5) every sample is clamped to z = 1,
# whose LM gradient is exactly zero, and a parity test of zeros would prove nothing.
ONE_STEP = {"train": {"steps": 1}, "hybrid_attention": {"hard_concrete": {"init_mean": 0.0}}}
GRANULARITY = {
    "kv_head": {"granularity": "kv_head", "constraint": "per_layer"},
    "layer": {"granularity": "layer", "constraint": "global"},
}


def _sections(granularity, layout=None):
    sections = copy.deepcopy(ONE_STEP)
    sections["hybrid_attention"].update(GRANULARITY[granularity])
    if layout:
        sections["parallel"] = layout
    return sections


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory, weights):
    return {
        g: run_distributed(
            train, 1, None, run_dir=str(tmp_path_factory.mktemp(f"ref-{g}")), sections=_sections(g), weights=weights
        )[0]
        for g in GRANULARITY
    }


@pytest.mark.parametrize("granularity", list(GRANULARITY))
@pytest.mark.parametrize("layout", [{"tensor": 2, "sequence_parallel": True}, {"pipeline": 2}], ids=["tp2", "pp2"])
def test_sampled_gates_are_rank_consistent_and_match_single_rank(tmp_path, layout, granularity, weights, single_rank):
    """Every rank of a forward samples the same z (noise seeded by (seed, step, layer)), so at TP=2 and
    PP=2 the step's loss, the z of each layer and the gate gradient (LM part, reduced over TP / PP / DP)
    equal one rank's."""
    results = run_distributed(
        train, 2, None, run_dir=str(tmp_path), sections=_sections(granularity, layout), weights=weights
    )
    ref = single_rank[granularity]
    ref_z = {layer: z for layer, z in ref["gates_used"]}
    for rank, result in enumerate(results):
        assert result["gates_used"], f"rank {rank} ran no gated layer"
        for layer, z in result["gates_used"]:
            assert torch.equal(z, ref_z[layer]), f"rank {rank} layer {layer}: z {z} vs one rank's {ref_z[layer]}"
    if "tensor" in layout:  # both TP ranks run every layer, with the same z
        assert [(layer, z.tolist()) for layer, z in results[0]["gates_used"]] == [
            (layer, z.tolist()) for layer, z in results[1]["gates_used"]
        ]
    a, b = results[0]["metrics"][0], ref["metrics"][0]
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"], (a, b)
    grad, ref_grad = results[0]["gate_grad"], ref["gate_grad"]
    scale = float(ref_grad.abs().max())
    diff = float((grad - ref_grad).abs().max())
    print(
        f"[consa] {granularity} {layout}: z equal on every rank; gate grad max |diff| {diff:.2e} of "
        f"max |grad| {scale:.2e}"
    )
    assert scale > 0 and diff <= 1e-5 * scale


def static_layer_outputs(full_heads):
    """HybridCoreAttention in static mode vs. the masked dense reference, values and gradients."""
    cfg = config()
    (model,) = build_model(cfg, cuda=False)
    attn = next(m for m in model.modules() if isinstance(m, HybridCoreAttention))
    attn.set_static(full_heads)
    g = torch.Generator().manual_seed(0)
    s, b, nq, nkv, hn = 32, 2, 8, 4, 8
    q, k, v = (torch.randn(s, b, n, hn, generator=g, requires_grad=True) for n in (nq, nkv, nkv))
    out = attn(q, k, v, None)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    # Reference: every query head through the masked dense form of its KV head's kernel.
    ref_heads = []
    qt, kt, vt = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    for h in range(nq):
        kv = h // (nq // nkv)
        args = (qt[:, h : h + 1], kt[:, kv : kv + 1], vt[:, kv : kv + 1])
        ref_heads.append(
            causal_attention(*args) if full_heads[kv] else sliding_window_attention_reference(*args, window=8)
        )
    ref = torch.cat(ref_heads, dim=1).permute(2, 0, 1, 3).reshape(s, b, nq * hn)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    return out.detach(), ref.detach(), grads, ref_grads


@pytest.mark.parametrize("full_heads", [[True, False, False, True], [False] * 4, [True] * 4])
def test_static_fast_path_matches_masked_reference(full_heads):
    out, ref, grads, ref_grads = run_distributed(static_layer_outputs, 1, full_heads=full_heads)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def gated_layer_outputs():
    """HybridCoreAttention in mask learning (per-KV-head gates) vs. z * causal + (1 - z) * masked dense
    sliding window per head: values and gradients, the gates' included."""
    cfg = config()
    (model,) = build_model(cfg, cuda=False)
    attn = next(m for m in model.modules() if isinstance(m, HybridCoreAttention))
    z = torch.tensor([0.9, 0.2, 0.5, 0.0], requires_grad=True)
    attn.set_gated(lambda training: z)
    g = torch.Generator().manual_seed(1)
    s, b, nq, nkv, hn = 32, 2, 8, 4, 8
    q, k, v = (torch.randn(s, b, n, hn, generator=g, requires_grad=True) for n in (nq, nkv, nkv))
    out = attn(q, k, v, None)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, z))
    ref_heads = []
    qt, kt, vt = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    for h in range(nq):
        kv = h // (nq // nkv)
        args = (qt[:, h : h + 1], kt[:, kv : kv + 1], vt[:, kv : kv + 1])
        ref_heads.append(
            z[kv] * causal_attention(*args) + (1 - z[kv]) * sliding_window_attention_reference(*args, window=8)
        )
    ref = torch.cat(ref_heads, dim=1).permute(2, 0, 1, 3).reshape(s, b, nq * hn)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, z))
    return out.detach(), ref.detach(), grads, ref_grads


def test_gated_layer_matches_the_mixture_of_both_references():
    out, ref, grads, ref_grads = run_distributed(gated_layer_outputs, 1)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("q", "k", "v", "z"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def one_pass_and_apart(mode, documents):
    """The gated and the static mixed layer computed in one pass of the fused CPU kernel and with each
    kernel run on its own heads (``fused = False``: SDPA for the full heads): values and gradients."""
    from megatron_ext.models.documents import document_starts

    cfg = config()
    (model,) = build_model(cfg, cuda=False)
    attn = next(m for m in model.modules() if isinstance(m, HybridCoreAttention))
    z = torch.tensor([0.9, 0.2, 0.5, 0.0], requires_grad=True)
    if mode == "gated":
        attn.set_gated(lambda training: z)
    else:
        attn.set_static([False, True, True, False])
    g = torch.Generator().manual_seed(2)
    s, b, nq, nkv, hn = 45, 2, 8, 4, 8
    q, k, v = (torch.randn(s, b, n, hn, generator=g, requires_grad=True) for n in (nq, nkv, nkv))
    mask = None
    if documents:
        tokens = torch.randint(1, 50, (b, s), generator=g)
        tokens[0, [9, 30]] = 0
        tokens[1, 20] = 0
        mask = document_starts(tokens, 0)
    results = {}
    for fused in (True, False):
        attn.fused = fused
        out = attn(q, k, v, mask)
        wrt = (q, k, v, z) if mode == "gated" else (q, k, v)
        results[fused] = (out.detach(), *torch.autograd.grad(out.square().sum(), wrt))
    return results


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("mode", ["gated", "static"])
def test_one_pass_layers_equal_their_kernels_run_apart(mode, documents):
    results = run_distributed(one_pass_and_apart, 1, mode=mode, documents=documents)[0]
    for name, got, want in zip(("out", "dq", "dk", "dv", "dz"), results[True], results[False]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=lambda m: f"{mode} {name}: {m}")


@pytest.mark.parametrize("constraint", ["per_layer", "global"])
def test_controller_reaches_target_then_static_hybrid_trains(tmp_path, constraint):
    sections = {
        "train": {"steps": 170, "lr": 1.0e-3},
        "logging": {"log_interval": 10},
        "hybrid_attention": {
            "constraint": constraint,
            "mask_learning_steps": 150,
            "target_warmup_steps": 40,
            "target": 0.5,
        },
    }
    result = run_distributed(train, 1, None, run_dir=str(tmp_path), sections=sections)[0]
    learning = [r for r in result["metrics"] if "consa/constraint_loss" in r]
    for r in learning[::3]:
        print(
            f"[consa {constraint}] step {r['step']:4d} rho_hat {r['consa/expected_swa_fraction']} "
            f"constraint {r['consa/constraint_loss']:+.4f}"
        )
    final = learning[-1]["consa/expected_swa_fraction"]
    for value in final if isinstance(final, list) else [final]:
        assert abs(value - 0.5) <= 0.02, final
    allocation = result["allocation"]
    assert allocation.shape == (4, 4)
    if constraint == "per_layer":
        assert (allocation.sum(dim=1) == 2).all()  # exactly round(0.5 * 4) SWA heads per layer
    else:
        assert int((~allocation).sum()) == 8
    record = json.loads((tmp_path / "allocation.json").read_text())
    assert record["achieved_swa_fraction"] == 0.5 and len(record["layers"]) == 4
    assert (tmp_path / "plots" / "consa_allocation.png").stat().st_size > 1000
    static_steps = [r for r in result["metrics"] if r["step"] > 150]
    assert static_steps and all(r["consa/swa_fraction"] == 0.5 for r in static_steps)


def test_resume_in_stage_one_restores_gates_and_lambdas_exactly(tmp_path):
    sections = {
        "train": {"steps": 8},
        "checkpoint": {"save_at_end": True},
        "hybrid_attention": {"mask_learning_steps": 20, "target_warmup_steps": 4},
    }
    straight = run_distributed(train, 1, None, run_dir=str(tmp_path / "a"), sections=sections)[0]
    run_distributed(train, 1, None, run_dir=str(tmp_path / "b"), sections=sections, preempt_after=4)
    resumed = run_distributed(train, 1, None, run_dir=str(tmp_path / "b"), sections=sections)[0]
    assert torch.equal(resumed["log_alpha"], straight["log_alpha"])
    keys = ("loss", "consa/expected_swa_fraction", "consa/lambda1", "consa/lambda2", "consa/constraint_loss")
    for a, b in zip(resumed["metrics"], straight["metrics"]):
        assert [a[k] for k in keys] == [b[k] for k in keys], a["step"]


def loza_run(run_dir, weights):
    """LoZA: 5 steps of gate learning on a frozen model, then the static hybrid with sink attention."""
    from megatron_ext.run.checks import checkpoint_dir
    from megatron_ext.training.checkpoint import load_model_weights

    sections = {
        "hybrid_attention": {
            "method": "loza",
            "granularity": "layer",
            "constraint": "global",
            "sink_tokens": 4,
            "mask_learning_steps": 5,
            "target": 0.5,
            "hard_concrete": {"init_mean": 0.0},
        },
        "train": {"steps": 8},
        "checkpoint": {"save_interval": 5, "keep_last": 3},
    }
    result = train(run_dir, sections, weights=weights)
    initialize_parallel_state(ParallelSizes())  # the trainer tore its own down
    try:
        (model,) = build_model(config(**sections), cuda=False)
        load_model_weights(checkpoint_dir(Path(run_dir) / "checkpoints" / "step_00000005"), [model])
        result["weights_at_binarization"] = full_named_tensors(model)
        result["sinks"] = {m.sink for m in model.modules() if isinstance(m, HybridCoreAttention)}
    finally:
        destroy_parallel_state()
    return result


def test_loza_learns_layer_gates_on_a_frozen_model_then_runs_sink_attention(tmp_path, weights):
    result = run_distributed(loza_run, 1, None, run_dir=str(tmp_path), weights=weights)[0]
    metrics = result["metrics"]
    print(f"[consa] loza: stage {[m['consa/stage'] for m in metrics]}, losses {[m['loss'] for m in metrics]}")
    assert [m["consa/stage"] for m in metrics] == [1] * 5 + [2] * 3
    assert [m.get("consa/model_frozen") for m in metrics] == [1] * 5 + [None] * 3
    for name, tensor in weights.items():  # stage 1 changed no weight
        assert torch.equal(result["weights_at_binarization"][name], tensor), name
    assert result["allocation"].shape == (4, 1) and int((~result["allocation"]).sum()) == 2
    assert result["sinks"] == {4}
    record = json.loads((tmp_path / "allocation.json").read_text())
    assert record["method"] == "loza" and record["achieved_swa_fraction"] == 0.5
