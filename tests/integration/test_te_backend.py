"""The Transformer Engine backend on one GPU (``model.backend: te``): its attention kernels against the
masked reference, a TE model against the local model with the same weights (loaded from the local
model's checkpoint, which also checks the checkpoint names), and training runs in bf16 and FP8 that
binarize, resume, and evaluate on the other backend. Skipped without a GPU or Transformer Engine."""

import math

import pytest
import torch

from megatron_ext.models.backend import te_import_error

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def transformer_engine():
    if te_import_error() is not None:
        pytest.skip(f"Transformer Engine does not import here: {te_import_error()}")


def _relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("hq, hkv, t, window", [(4, 4, 256, None), (4, 2, 300, 64), (2, 1, 200, 500), (6, 3, 512, 1)])
def test_te_kernels_match_the_masked_reference(hq, hkv, t, window):
    from megatron_ext.models.kernels import causal_attention, sliding_window_attention_reference
    from megatron_ext.models.te_attention import TEKernels

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 64, generator=gen).cuda().bfloat16().requires_grad_() for h in (hq, hkv, hkv))
    grad = torch.randn(2, hq, t, 64, generator=gen).cuda().bfloat16()
    kernels = TEKernels(head_dim=64, softmax_scale=0.125, layer_number=1)
    out = kernels(q, k, v, window)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = (
        causal_attention(*exact, 0.125)
        if window is None
        else sliding_window_attention_reference(*exact, window=window, scale=0.125)
    )
    want = (ref, *torch.autograd.grad(ref, exact, grad.float()))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape
        assert _relative_error(g, w) <= 2e-2, f"{name}: relative error {_relative_error(g, w):.2e}"


TINY = {
    "model": {
        "num_layers": 3,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 512,
        "vocab_size": 1024,
        "qk_layernorm": True,
    },
    "data": {"seq_length": 256},
    "train": {"micro_batch_size": 2, "global_batch_size": 2, "precision": "bf16"},
    "moe": {
        "enabled": True,
        "num_experts": 8,
        "top_k": 2,
        "expert_ffn_hidden_size": 128,
        "shared_expert_ffn_hidden_size": 128,
        "first_k_dense": 1,
    },
    "hybrid_attention": {
        "enabled": True,
        "granularity": "kv_head",
        "window": 64,
        "target": 0.5,
        "mask_learning_steps": 1,
    },
}


def _losses_and_grads(model, tokens):
    from megatron_ext.consa.attention import HybridCoreAttention

    for module in model.modules():
        if isinstance(module, HybridCoreAttention):  # a KV-head-mixed layer: one FA, one SWA KV head
            module.set_static([True, False])
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    losses = model(tokens[:, :-1], position_ids[:, :-1], None, labels=tokens[:, 1:])
    loss = losses.float().mean()
    model.zero_grad()
    loss.backward()
    grads = {
        name: (p.main_grad if hasattr(p, "main_grad") else p.grad).float().norm().item()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return loss.item(), grads


def test_te_model_matches_the_local_model_with_the_same_weights(tmp_path):
    import dataclasses

    from megatron_ext.config import from_dict
    from megatron_ext.optim import build_optimizer
    from megatron_ext.parallel import ParallelSizes
    from megatron_ext.parallel.state import parallel_job
    from megatron_ext.run import RunConfig
    from megatron_ext.run.builder import build_model
    from megatron_ext.training import checkpoint
    from megatron_ext.training.ddp import wrap_with_ddp
    from megatron_ext.training.loop import optimizer_config

    cfg = from_dict(RunConfig, TINY)
    with parallel_job(ParallelSizes()):
        local_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend="local"))
        te_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend="te"))
        local = wrap_with_ddp(build_model(local_cfg, cuda=True))
        path = checkpoint.CheckpointManager(tmp_path, keep_last=1).save(
            0, local, build_optimizer(optimizer_config(local_cfg, cuda=True), local), checkpoint.CommonState()
        )
        te = wrap_with_ddp(build_model(te_cfg, cuda=True))
        assert any("layer_norm_weight" in name for name, _ in te[0].named_parameters()), "not a TE model"
        checkpoint.load_model_weights(path, te)  # the local checkpoint, by its names
        tokens = torch.randint(0, 1024, (2, 257), generator=torch.Generator().manual_seed(0)).cuda()
        local_loss, local_grads = _losses_and_grads(local[0].module, tokens)
        te_loss, te_grads = _losses_and_grads(te[0].module, tokens)
    assert math.isfinite(te_loss) and abs(te_loss - local_loss) <= 1e-2 * local_loss, (te_loss, local_loss)
    # Same parameters under the TE names: compare the gradient norms of what both have by one name,
    # and the total.
    shared = [name for name in local_grads if name in te_grads]
    assert len(shared) > 10
    for name in shared:
        assert abs(te_grads[name] - local_grads[name]) <= 5e-2 * local_grads[name] + 1e-6, name
    assert sum(te_grads.values()) == pytest.approx(sum(local_grads.values()), rel=5e-2)


TRAIN = {
    **TINY,
    "train": {"micro_batch_size": 4, "global_batch_size": 8, "steps": 30, "lr": 3.0e-3, "warmup_steps": 4},
    "model": {**TINY["model"], "backend": "te"},
    "checkpoint": {"save_interval": 20, "keep_last": 2},
    "logging": {"log_interval": 1},
    "routing": {"expert_bias": True, "bias_update_rate": 1.0e-3},
    "elastic": {"enabled": True},
    "hybrid_attention": {**TINY["hybrid_attention"], "mask_learning_steps": 12, "target_warmup_steps": 4},
}


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_te_training_runs_binarize_resume_and_evaluate_on_the_local_backend(tmp_path, precision):
    import json
    import subprocess
    import sys

    import yaml

    from megatron_ext.training.rundir import read_metrics
    from tests.integration.test_train_entry import REPO, finish, launch

    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"no FP8 tensor cores on {torch.cuda.get_device_name()}")
    config, run_dir = tmp_path / "te.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(TRAIN))
    proc = launch(config, run_dir, f"train.precision={precision}", "train.steps=20", nproc=1)
    out = finish(proc, timeout=240)
    assert proc.returncode == 0, out
    proc = launch(config, run_dir, f"train.precision={precision}", nproc=1)  # resumes at 20, runs to 30
    out = finish(proc, timeout=240)
    assert proc.returncode == 0, out
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert sum(r["loss"] for r in records[-5:]) < sum(r["loss"] for r in records[:5])
    assert json.loads((run_dir / "allocation.json").read_text())
    # The TE run's checkpoint, evaluated by the local modules (its names are the local ones).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.evaluate",
            "--run-dir",
            str(run_dir),
            "--batches",
            "2",
            "--set",
            "model.backend=local",
            "--set",
            "train.precision=bf16",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validation loss" in proc.stdout
