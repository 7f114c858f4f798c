"""Context-parallel communication: bytes a rank receives per attention layer and training step
(forward + backward), sliding-window heads (halo exchange) against full-attention heads
(all-gather of K and V), counted by the exchanges themselves (``ContextParallel.received_bytes``).

    python -m benchmarks.cp_comm_bench

A full-attention rank receives the other ranks' ``(CP - 1) * T / CP`` positions of K and V; a
sliding-window rank only the halos before its two chunks, at most ``2 (W - 1)`` positions, so the
ideal ratio is about ``W / (T / CP)`` (:mod:`megatron_ext.parallel.context`). The layers are the
hybrid core attention in its static modes (all heads full, all sliding, half and half), on CP gloo
ranks of this machine; the byte counts depend on the shapes only.
"""

from __future__ import annotations

from typing import List

import torch

from benchmarks.common import command_line, row

HEADS, KV_HEADS, HEAD_DIM, WINDOW = 8, 4, 64, 512
CASES = [(4096, 2), (8192, 2), (8192, 4)]  # (T, CP)
MODES = {
    "full": [True] * KV_HEADS,
    "swa": [False] * KV_HEADS,
    "mixed": [True] * (KV_HEADS // 2) + [False] * (KV_HEADS // 2),
}


def layer_bytes(seq_length: int) -> dict:
    """Rank body: mean bytes received per rank for one forward + backward of one layer, per mode."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.consa.attention import HybridCoreAttention

    cp_size = parallel_state.get_context_parallel_world_size()
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=KV_HEADS,
        context_parallel_size=cp_size,
        attention_dropout=0.0,
    )
    local = seq_length // cp_size
    g = torch.Generator().manual_seed(0)
    out = {}
    for mode, allocation in MODES.items():
        attention = HybridCoreAttention(config, 1, window=WINDOW)
        attention.set_static(allocation)
        q = torch.randn(local, 1, HEADS, HEAD_DIM, generator=g, requires_grad=True)  # [s, b, np, hn]
        k = torch.randn(local, 1, KV_HEADS, HEAD_DIM, generator=g, requires_grad=True)
        v = torch.randn(local, 1, KV_HEADS, HEAD_DIM, generator=g, requires_grad=True)
        attention(q, k, v).sum().backward()
        total = torch.tensor(float(sum(attention.cp.received_bytes.values())), dtype=torch.float64)
        dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
        out[mode] = float(total) / cp_size
    return out


def run(reps: int = 1) -> List[dict]:
    """``reps`` is accepted for the harness; byte counts are exact, so one measurement is enough."""
    from megatron_ext.parallel import ParallelSizes
    from megatron_ext.testing.distributed import run_distributed

    rows = []
    for seq_length, cp in CASES:
        counts = run_distributed(layer_bytes, cp, ParallelSizes(cp=cp), seq_length=seq_length)[0]
        shape = f"T={seq_length} W={WINDOW} CP={cp}"
        ideal = WINDOW / (seq_length / cp)
        rows.append(
            row(
                "cp_comm",
                f"SWA / FA bytes per layer-step, {shape}",
                counts["swa"] / counts["full"],
                f"<= {1.05 * ideal:.3f}",
                ideal,
            )
        )
        rows.append(
            row(
                "cp_comm",
                f"mixed 50% / FA bytes per layer-step, {shape}",
                counts["mixed"] / counts["full"],
                f"<= {1.05 * (1 + ideal) / 2:.3f}",
                (1 + ideal) / 2,
            )
        )
        rows.append(
            row("cp_comm", f"FA MiB received per rank per layer-step, {shape}", counts["full"] / 2**20, "report")
        )
        rows.append(
            row("cp_comm", f"SWA MiB received per rank per layer-step, {shape}", counts["swa"] / 2**20, "report")
        )
    return rows


if __name__ == "__main__":
    command_line(run, __doc__, default_reps=1)
