"""Attention cost, measured side by side: sliding-window against full causal attention.

Kernels, for each sequence length T (b=1, h=8, d=64, window W, default 512), forward (inputs that
require grad, as in training) and forward+backward:

    FA   causal_attention                 (scaled_dot_product_attention, is_causal=True)
    SWA  sliding_window_attention         (CPU: the fused O(T*W) C++ kernel; CUDA: FlexAttention)

next to ideal_flop_ratio(T, W), the fraction of the causal (query, key) pairs the band keeps.

Layers (``HybridCoreAttention``, the core attention a hybrid model runs, T=4096 by default):

    gated   stage 1 (mask learning): every KV head mixes FA and SWA by its gate z, both computed,
            gradient to z included; ConSA's training cost, target <= 1.28x the full layer (on the CPU
            one pass of the fused kernel computes both from the same scores)
    mixed   static hybrid at rho = 0.5: half the KV heads FA, half SWA (on the CPU one call of the
            fused kernel with a window per KV head)

against the same module in full mode. Ratios are medians of per-repetition ratios, cases
interleaved (benchmarks/common.py).

    python benchmarks/swa_kernel_bench.py [--T 2048 4096 8192] [--window 512] [--reps 7] [--threads 2]
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.common import interleaved, median, ratio, row, single_process_megatron
from megatron_ext.models.kernels import (
    DEFAULT_BLOCK_SIZE,
    causal_attention,
    ideal_flop_ratio,
    sliding_window_attention,
    sliding_window_attention_blocked,
)

HEADS, HEAD_DIM = 8, 64


def _inputs(seq_len: int, heads: int, kv_heads: int, head_dim: int, device, dtype, layout: str = "bhsd"):
    """q, k, v requiring grad, and an output gradient; ``bhsd`` = [b, h, T, d], ``sbhd`` = [T, b, h, d]."""
    gen = torch.Generator().manual_seed(0)

    def make(h):
        t = torch.randn(1, h, seq_len, head_dim, generator=gen)
        if layout == "sbhd":
            t = t.permute(2, 0, 1, 3).contiguous()
        return t.to(device=device, dtype=dtype).requires_grad_()

    return make(heads), make(kv_heads), make(kv_heads), make(heads).detach()


def _cases(kernels: Dict[str, Callable], wrt: Dict[str, tuple], grad: torch.Tensor) -> Dict[str, Callable]:
    """Forward and forward+backward of each kernel; ``wrt[name]``: what its backward differentiates."""
    cases = {f"{name}_fwd": fn for name, fn in kernels.items()}
    for name, fn in kernels.items():
        cases[f"{name}_fwdbwd"] = (lambda f, w: lambda: torch.autograd.grad(f(), w, grad))(fn, wrt[name])
    return cases


def bench_kernels(
    seq_len: int, window: int, reps: int, block_size: Optional[int] = None, device="cpu", dtype=torch.float32
) -> Dict[str, List[float]]:
    """Times of FA and SWA, forward and forward+backward (keys ``fa_fwd``, ``swa_fwdbwd``, ...)."""
    q, k, v, grad = _inputs(seq_len, HEADS, HEADS, HEAD_DIM, device, dtype)

    def swa():
        if block_size is not None and not q.is_cuda:
            return sliding_window_attention_blocked(q, k, v, window, block_size=block_size)
        return sliding_window_attention(q, k, v, window)

    kernels = {"fa": lambda: causal_attention(q, k, v), "swa": swa}
    return interleaved(_cases(kernels, dict.fromkeys(kernels, (q, k, v)), grad), reps)


def _hybrid_modules(window: int, device):
    """HybridCoreAttention in full, gated (per-KV-head gates) and static rho=0.5 modes, and the
    gates' parameter."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.consa.attention import HybridCoreAttention

    single_process_megatron()
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=HEADS,
        kv_channels=HEAD_DIM,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    modules = {
        name: HybridCoreAttention(config, layer_number=1, window=window).to(device)
        for name in ("full", "gated", "mixed")
    }
    log_alpha = torch.zeros(HEADS, device=device, requires_grad=True)  # gates at z = 0.5 on average
    modules["gated"].set_gated(lambda training: torch.sigmoid(log_alpha))
    modules["mixed"].set_static([h % 2 == 0 for h in range(HEADS)])
    return modules, log_alpha


def bench_layers(seq_len: int, window: int, reps: int, device="cpu", dtype=torch.float32) -> Dict[str, List[float]]:
    """Times of the hybrid core attention in full, gated and mixed modes (fwd and fwd+bwd)."""
    modules, log_alpha = _hybrid_modules(window, device)
    q, k, v, grad = _inputs(seq_len, HEADS, HEADS, HEAD_DIM, device, dtype, layout="sbhd")
    kernels = {name: (lambda m: lambda: m(q, k, v))(m) for name, m in modules.items()}
    wrt = {"full": (q, k, v), "gated": (q, k, v, log_alpha), "mixed": (q, k, v)}
    return interleaved(_cases(kernels, wrt, grad.flatten(2)), reps)  # the module returns [s, b, h * d]


# Within 15% of the FLOP ideal: SWA / FA at T = 4096 (0.27) and 8192, the hybrid layers at 4096.
FLOP_IDEAL_MARGIN = 1.15


def _within_ideal(ideal: float) -> str:
    return f"<= {FLOP_IDEAL_MARGIN * ideal:.3f}"


def run(reps: int = 5, seq_lens=(2048, 4096, 8192), window: int = 512, layer_seq_len: int = 4096) -> list:
    """Rows for the benchmark report: SWA / FA kernel ratios beside the ideal, then the layers."""
    rows = []
    for seq_len in seq_lens:
        t = bench_kernels(seq_len, window, reps)
        ideal = ideal_flop_ratio(seq_len, window)
        for part, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            rows.append(
                row(
                    "attention",
                    f"SWA / FA {label}, T={seq_len}, W={window}",
                    ratio(t, f"swa_{part}", f"fa_{part}"),
                    _within_ideal(ideal) if seq_len >= 4096 else "",
                    ideal,
                )
            )
    t = bench_layers(layer_seq_len, window, reps)
    band = ideal_flop_ratio(layer_seq_len, window)
    # The gated layer computes the scores once for both kernels (the fused CPU kernel's dual mode): in
    # units of the full layer's score GEMM, forward 2 + band (S, P V, the band's P V) against 2, and
    # forward+backward 7 + 3 band (the backward adds S again, dV, dP, dQ, dK, and the band's dV, dP)
    # against 7.
    ideal_gated = {"fwd": 1.0 + band / 2, "fwdbwd": 1.0 + 3 * band / 7}
    ideal_mixed = (1.0 + band) / 2
    for part, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
        rows.append(
            row(
                "attention",
                f"gated (stage 1) / FA layer {label}, T={layer_seq_len}",
                ratio(t, f"gated_{part}", f"full_{part}"),
                "<= 1.28",
                ideal_gated[part],
            )
        )
    for part, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
        rows.append(
            row(
                "attention",
                f"KV-head mixed rho=0.5 / FA layer {label}, T={layer_seq_len}",
                ratio(t, f"mixed_{part}", f"full_{part}"),
                "<= 0.66",
                ideal_mixed,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[2048, 4096, 8192], help="sequence lengths")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="query block of the CPU SWA kernel")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"b=1 h={HEADS} d={HEAD_DIM} fp32 W={args.window} bq={args.block_size} threads={torch.get_num_threads()} "
        f"torch {torch.__version__}; medians of {args.reps}"
    )
    header = (
        f"{'T':>6} | {'FA fwd ms':>9} {'SWA fwd ms':>10} {'ratio':>6} | "
        f"{'FA f+b ms':>9} {'SWA f+b ms':>10} {'ratio':>6} | {'ideal':>6}"
    )
    print(header)
    print("-" * len(header))
    for seq_len in args.T:
        t = bench_kernels(seq_len, args.window, args.reps, block_size=args.block_size)
        columns = [f"{seq_len:>6}"]
        for part in ("fwd", "fwdbwd"):
            columns.append(
                f"{median(t, f'fa_{part}') * 1e3:>9.1f} {median(t, f'swa_{part}') * 1e3:>10.1f} "
                f"{ratio(t, f'swa_{part}', f'fa_{part}'):>6.3f}"
            )
        columns.append(f"{ideal_flop_ratio(seq_len, args.window):>6.3f}")
        print(" | ".join(columns))


if __name__ == "__main__":
    main()
