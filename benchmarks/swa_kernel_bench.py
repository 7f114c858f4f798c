"""Wall time of the blocked sliding-window attention kernel against causal SDPA on CPU.

For each sequence length T: b=1, h=8, d=64, fp32, window W (default 512). Forward (with inputs that
require grad, as in training) and forward+backward of

    FA   causal_attention                  (scaled_dot_product_attention, is_causal=True)
    SWA  sliding_window_attention_blocked

are timed with time.perf_counter after a warm-up, FA and SWA alternating within each repetition so
that both see the same machine load; the table gives medians and the ratios SWA / FA next to
ideal_flop_ratio(T, W), the fraction of the causal (query, key) pairs that the band keeps.

    python benchmarks/swa_kernel_bench.py [--T 2048 4096 8192] [--window 512] [--reps 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_ext.consa.kernels import (
    DEFAULT_BLOCK_SIZE,
    causal_attention,
    ideal_flop_ratio,
    sliding_window_attention_blocked,
)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_one(seq_len: int, window: int, block_size: int, reps: int, heads: int = 8, head_dim: int = 64):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(1, heads, seq_len, head_dim, generator=gen)
    kernels = {
        "fa": lambda: causal_attention(q, k, v),
        "swa": lambda: sliding_window_attention_blocked(q, k, v, window, block_size=block_size),
    }

    def fwd_bwd(kernel):
        return lambda: torch.autograd.grad(kernel(), (q, k, v), grad)

    cases = {f"{name}_fwd": fn for name, fn in kernels.items()}
    cases.update({f"{name}_fwdbwd": fwd_bwd(fn) for name, fn in kernels.items()})
    for fn in cases.values():  # warm-up: first-touch allocations, thread pools
        fn()
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(reps: int = 5, seq_lens=(2048, 4096, 8192), window: int = 512) -> list:
    """Rows for the benchmark report: SWA / FA time ratios beside the ideal FLOP ratio."""
    targets = {4096: {"fwd": "<= 0.35", "fwdbwd": "<= 0.5"}}
    rows = []
    for seq_len in seq_lens:
        m = bench_one(seq_len, window, DEFAULT_BLOCK_SIZE, reps)
        for part, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            rows.append({"benchmark": "attention", "metric": f"SWA / FA {label}, T={seq_len}, W={window}",
                         "value": m[f"swa_{part}"] / m[f"fa_{part}"],
                         "target": targets.get(seq_len, {}).get(part, ""),
                         "ideal": ideal_flop_ratio(seq_len, window)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192], help="sequence lengths")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="query block of the SWA kernel"
    )
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"b=1 h=8 d=64 fp32 W={args.window} bq={args.block_size} threads={torch.get_num_threads()} "
        f"torch {torch.__version__}; median of {args.reps}"
    )
    header = (
        f"{'T':>6} | {'FA fwd ms':>9} {'SWA fwd ms':>10} {'ratio':>6} | "
        f"{'FA f+b ms':>9} {'SWA f+b ms':>10} {'ratio':>6} | {'ideal':>6}"
    )
    print(header)
    print("-" * len(header))
    for seq_len in args.T:
        m = bench_one(seq_len, args.window, args.block_size, args.reps)
        columns = [f"{seq_len:>6}"]
        for part in ("fwd", "fwdbwd"):
            fa, swa = m[f"fa_{part}"], m[f"swa_{part}"]
            columns.append(f"{fa * 1e3:>9.1f} {swa * 1e3:>10.1f} {swa / fa:>6.3f}")
        columns.append(f"{ideal_flop_ratio(seq_len, args.window):>6.3f}")
        print(" | ".join(columns))


if __name__ == "__main__":
    main()
