"""Elastic MoE cost, measured side by side: training-step time of sub-networks and EP layouts.

Model: a CPU-sized fine-grained MoE GPT (d=256, 4 layers, 8 heads, every layer MoE with 16
experts of width 256 and top-4, a shared expert of width 256, T=512, micro-batch 4), a full
training step (forward, backward, gradient reduction, AdamW) on synthetic tokens.

1. Elastic sub-networks on one rank (cases interleaved, ratio to the full network):
   top-k 4 -> 1 (25 %), 16 -> 8 experts (half, top-k kept), and both at once.
2. Expert parallelism on 2 gloo ranks, same global batch: EP=2 (experts split, token alltoall,
   no expert-gradient all-reduce) vs EP=1 (experts replicated on both data-parallel ranks).
   Reported, no target: on CPU the alltoall goes through gloo over loopback.

    python -m benchmarks.moe_bench [--reps 5]
"""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional

import torch

from benchmarks.common import command_line, interleaved, median, ratio, row, single_process_megatron, training_step

SHAPE = dict(
    num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=704, vocab_size=4096
)
MOE = dict(enabled=True, num_experts=16, top_k=4, expert_ffn_hidden_size=256, shared_expert_ffn_hidden_size=256)


def run_config(
    world: int = 1,
    expert_parallel: int = 1,
    shape: Optional[dict] = None,
    moe: Optional[dict] = None,
    seq_length: int = 512,
    micro_batch_size: int = 4,
    precision: str = "auto",
):
    from megatron_ext.config import from_dict
    from megatron_ext.run import RunConfig

    return from_dict(
        RunConfig,
        {
            "model": shape or SHAPE,
            "parallel": {"expert": expert_parallel},
            "data": {"seq_length": seq_length},
            "train": {
                "micro_batch_size": micro_batch_size,
                "global_batch_size": micro_batch_size * world,
                "precision": precision,
            },
            "moe": moe or MOE,
            "routing": {"expert_bias": False},
        },
    )


def subnetworks(num_experts: int, top_k: int) -> Dict[str, tuple]:
    """name -> (experts, top-k) of the compared sub-networks; every layer kept."""
    half = tuple(range(num_experts // 2))
    quarter_k = max(1, top_k // 4)
    return {
        "full": (None, top_k),
        "top-k 25%": (None, quarter_k),
        "half experts": (half, top_k),
        "half experts, top-k 25%": (half, quarter_k),
    }


def bench_subnetworks(reps: int, cfg=None) -> Dict[str, List[float]]:
    """Training-step times of the sub-networks of :func:`subnetworks` (default: :func:`run_config`)."""
    from megatron_ext.moe import elastic
    from megatron_ext.moe.elastic import SubNetwork
    from megatron_ext.run.builder import build_model

    single_process_megatron()
    cfg = cfg or run_config()
    chunks = build_model(cfg, cuda=torch.cuda.is_available())
    step = training_step(cfg, chunks)
    layers = tuple(range(cfg.model.num_layers))

    def case(experts, top_k):
        sub = SubNetwork(layers=layers, experts=experts, top_k=top_k)

        def run():
            elastic.apply(chunks, sub)
            try:
                step()
            finally:
                elastic.reset(chunks)

        return run

    subs = subnetworks(cfg.moe.num_experts, cfg.moe.top_k)
    return interleaved({name: case(*spec) for name, spec in subs.items()}, reps)


def _ep_steps(expert_parallel: int, steps: int) -> List[float]:
    """On each of 2 ranks: ``steps`` + 1 training steps at the given EP size; the timed ones."""
    import torch.distributed as dist

    from benchmarks.common import seconds
    from megatron_ext.run.builder import build_model

    cfg = run_config(world=2, expert_parallel=expert_parallel)
    step = training_step(cfg, build_model(cfg, cuda=False))  # each data-parallel rank its own micro-batch
    times = []
    for i in range(steps + 1):
        dist.barrier()
        elapsed = seconds(step)
        if i:
            times.append(elapsed)
    return times


def bench_expert_parallel(reps: int, steps: int = 2) -> Dict[str, List[float]]:
    """Per round: ``steps`` timed steps at EP=1 and at EP=2 (order alternating); round medians
    of the slower rank."""
    from megatron_ext.parallel import ParallelSizes
    from megatron_ext.testing.distributed import run_distributed

    times: Dict[str, List[float]] = {"ep1": [], "ep2": []}
    for rep in range(reps):
        for ep in (1, 2) if rep % 2 == 0 else (2, 1):
            per_rank = run_distributed(
                _ep_steps, 2, ParallelSizes(ep=ep), timeout=900.0, expert_parallel=ep, steps=steps
            )
            times[f"ep{ep}"].append(statistics.median(max(ts) for ts in zip(*per_rank)))
    return times


def subnetwork_rows(t: Dict[str, List[float]], label: str = "") -> list:
    return [
        row("moe", f"step time {name} / full{label}", ratio(t, name, "full"), "report") for name in t if name != "full"
    ]


def run(reps: int = 5) -> list:
    t = bench_subnetworks(reps)
    rows = subnetwork_rows(t)
    rows.append(row("moe", "full step time (s, median)", median(t, "full"), "report"))
    ep = bench_expert_parallel(max(1, reps // 2))
    rows.append(row("moe", "step time EP=2 / EP=1, 2 gloo ranks", ratio(ep, "ep2", "ep1"), "report"))
    return rows


if __name__ == "__main__":
    command_line(run, __doc__)
