"""The training entry point on one GPU: bf16, Megatron's own optimizer, FlexAttention SWA heads,
every capability on (ConSA mask learning then the static hybrid, elastic MoE with expert bias,
SGT loop growth), checkpoint and resume. Skipped where there is no CUDA device."""

import json
import math

import pytest

from megatron_ext.training.rundir import read_metrics
from tests.integration.test_train_entry import finish, launch

GPU_RUN = {
    "name": "gpu-tiny",
    "model": {
        "num_layers": 4,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 256,
        "vocab_size": 512,
        "qk_layernorm": True,
    },
    "data": {"seq_length": 256},
    "train": {
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "steps": 40,
        "lr": 3.0e-3,
        "warmup_steps": 4,
        "precision": "bf16",
    },
    "checkpoint": {"save_interval": 20, "keep_last": 2},
    "logging": {"log_interval": 1},
    "moe": {
        "enabled": True,
        "num_experts": 8,
        "top_k": 2,
        "expert_ffn_hidden_size": 64,
        "shared_expert_ffn_hidden_size": 64,
        "first_k_dense": 1,
    },
    "routing": {"expert_bias": True, "bias_update_rate": 1.0e-3},
    "elastic": {"enabled": True},
    "hybrid_attention": {
        "enabled": True,
        "granularity": "kv_head",
        "window": 64,
        "target": 0.5,
        "mask_learning_steps": 15,
        "target_warmup_steps": 5,
    },
    "looping": {
        "enabled": True,
        "first_selection_step": 5,
        "window": 5,
        "top_k_layers": 2,
        "max_selected_layers": 2,
        "num_keep_heads": 1,
    },
}


@pytest.mark.gpu
def test_bf16_run_with_every_capability_trains_binarizes_and_resumes(tmp_path):
    import yaml

    config, run_dir = tmp_path / "gpu.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(GPU_RUN))
    proc = launch(config, run_dir, "train.steps=30", nproc=1)
    out = finish(proc, timeout=180)
    assert proc.returncode == 0, out
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(math.isfinite(r["loss"]) for r in records), [r["loss"] for r in records]
    assert sum(r["loss"] for r in records[-5:]) < sum(r["loss"] for r in records[:5])
    allocation = json.loads((run_dir / "allocation.json").read_text())
    assert allocation, "binarization wrote no allocation"
    assert records[-1]["mem/peak_gib"] > 0

    proc = launch(config, run_dir, nproc=1)  # the same command resumes at step 30 and runs to 40
    out = finish(proc, timeout=180)
    assert proc.returncode == 0, out
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41)), "resume repeated or skipped steps"
    assert records[-1]["consumed_samples"] == 40 * 8
    assert all(math.isfinite(r["loss"]) for r in records[30:])
