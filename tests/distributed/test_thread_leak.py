"""A finished training run frees its process groups: the gloo threads of a pooled worker do not grow
with the number of runs it has done (before: ~48 more per MoE run, the model kept alive by autograd
graphs that reach Megatron DDP's hooks through C++ objects)."""

import os
from pathlib import Path

from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from tests.configs import TINY, merge

CONFIG = merge(
    TINY,
    {
        "parallel": {"tensor": 2, "expert": 2, "expert_tensor": 1, "sequence_parallel": True},
        "data": {"kind": "synthetic"},
        "train": {"global_batch_size": 2, "steps": 2, "warmup_steps": 1, "eval_interval": 0},
        "checkpoint": {"save_interval": 1, "save_at_end": False},
        "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32},
    },
)


def threads_after_runs(run_dir, runs):
    from megatron_ext.training.loop import Trainer

    counts = []
    for i in range(runs):
        Trainer(from_dict(RunConfig, CONFIG), Path(run_dir) / f"run{i}_{os.getpid()}", log=lambda line: None).run()
        counts.append(len(os.listdir("/proc/self/task")))
    return counts


def test_training_runs_do_not_accumulate_threads(tmp_path):
    counts = run_distributed(threads_after_runs, 2, None, run_dir=str(tmp_path), runs=4)
    print(f"[threads] per rank after each of 4 runs: {counts}")
    for per_rank in counts:
        assert per_rank[-1] - per_rank[0] <= 3 * 3, per_rank  # one small group per run at most
