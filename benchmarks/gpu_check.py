"""GPU figures for ``benchmarks/gpu_check.sh`` (one H100 / H200): MFU, attention kernels, MoE.

1. **MFU of a ~0.6B hybrid model**: the Qwen3-0.6B shape (configs/qwen3_0p6b.yaml) with hybrid
   attention, every layer a static KV-head mix at rho = 0.5 (half the KV heads sliding-window,
   W = 512), T = 4096, full training steps (Megatron DDP + Megatron's optimizer), on each backend
   the machine has: ``local`` bf16 (FlexAttention for the window heads, SDPA / flash for the
   others), ``te`` bf16 (Transformer Engine: fused norm + linear layers, TE attention with
   ``window_size``; target MFU >= 0.45) and ``te`` fp8 (FP8 GEMMs, on GPUs with FP8 tensor cores,
   compute capability >= 8.9). MFU = model FLOPs / time / peak, where model FLOPs are the matmul
   FLOPs the step needs: projections, MLP and logits (3 x forward), and attention scores + PV over
   the keys each query sees (the causal triangle for FA heads, the band for SWA heads). The peak is
   the dense bf16 peak of the card (H100 / H200 SXM: 989 TFLOP/s) or ``--peak-tflops``, for FP8
   too (so an FP8 MFU above 0.5 is possible; the FP8 peak is twice the bf16 one).
2. **Attention kernels**: SWA / FA at T = 8192 (and 4096), W = 512, bf16, forward and
   forward+backward; gated and rho = 0.5 mixed layers against the full layer
   (benchmarks/swa_kernel_bench.py on the GPU).
3. **MoE throughput without expert parallelism**: a fine-grained MoE GPT (d = 1024, 8 layers, 64
   experts of 512, top-8, a shared expert of 1024; every layer MoE), bf16, T = 4096, tokens/s of
   full training steps on each backend (``te``: the experts as one grouped GEMM; ``local``: one
   GEMM per expert), and the elastic sub-networks' step-time ratios.

``--tiny`` runs the same code at toy sizes (on CPU too), to check it without a GPU.

    python -m benchmarks.gpu_check [--tiny] [--reps 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import interleaved, median, meets, ratio, row, single_process_megatron, training_step

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
"""Dense bf16 tensor-core peak (SXM parts), TFLOP/s."""


def peak_tflops(override: Optional[float]) -> Optional[float]:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


# -- 1. MFU of the hybrid 0.6B model ------------------------------------------------------------


def backends() -> list:
    """(backend, precision) pairs this machine runs: local bf16, and te bf16 / fp8 where Transformer
    Engine imports (fp8 on compute capability >= 8.9); local fp32 alone on a CPU."""
    from megatron_ext.models.backend import te_import_error

    if not torch.cuda.is_available():
        return [("local", "fp32")]
    pairs = [("local", "bf16")]
    if te_import_error() is None:
        pairs.append(("te", "bf16"))
        if torch.cuda.get_device_capability() >= (8, 9):
            pairs.append(("te", "fp8"))
    else:
        print(f"Transformer Engine does not import ({te_import_error()}): the te rows are left out", flush=True)
    return pairs


def hybrid_config(tiny: bool, seq_length: int, window: int, backend: str = "local", precision: str = "auto"):
    from megatron_ext.run import load_config

    overrides = [
        f"data.seq_length={seq_length}",
        "train.micro_batch_size=1",
        "train.global_batch_size=4",
        "hybrid_attention.enabled=true",
        "hybrid_attention.granularity=kv_head",
        f"hybrid_attention.window={window}",
        "hybrid_attention.mask_learning_steps=1",
        f"model.backend={backend}",
        f"train.precision={precision}",
    ]
    if tiny:
        overrides += [
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.kv_channels=16",
            "model.ffn_hidden_size=128",
            "model.vocab_size=512",
        ]
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "qwen3_0p6b.yaml", overrides)


def hybrid_model_flops(cfg, swa_fraction: float, window: int, padded_vocab: int, sequences: int) -> float:
    """Training matmul FLOPs of one step of ``sequences`` sequences (see the module doc): the
    analytic count of :mod:`megatron_ext.sgt.flops` (which charges every head the full T x T
    scores), with the attention core charged only for the pairs each head sees."""
    import dataclasses

    from megatron_ext.models.kernels import ideal_flop_ratio
    from megatron_ext.sgt.flops import TRAINING_MULTIPLIER, GPTShape, training_flops

    shape = dataclasses.replace(GPTShape.from_run_config(cfg, padded_vocab), batch_size=sequences)
    t, heads, d = shape.seq_length, shape.num_heads, shape.head_dim
    causal_pairs = t * (t + 1) / 2
    pairs_per_head = causal_pairs * ((1 - swa_fraction) + swa_fraction * ideal_flop_ratio(t, window))
    per_layer_core = 4 * d * heads * sequences  # scores + PV, per (query, key) pair of one head
    counted, needed = per_layer_core * t * t, per_layer_core * pairs_per_head
    return training_flops(shape) + TRAINING_MULTIPLIER * shape.num_layers * (needed - counted)


def bench_mfu(tiny: bool, reps: int, peak: Optional[float]) -> list:
    rows = []
    for backend, precision in backends():
        rows += bench_mfu_of(tiny, reps, peak, backend, precision)
    return rows


def bench_mfu_of(tiny: bool, reps: int, peak: Optional[float], backend: str, precision: str) -> list:
    from megatron_ext.consa.attention import HybridCoreAttention
    from megatron_ext.models.vocab import padded_vocab_size
    from megatron_ext.run.builder import build_model

    seq, window, micro_batches = (128, 32, 2) if tiny else (4096, 512, 4)
    cfg = hybrid_config(tiny, seq, window, backend, precision)
    label = f"{backend} {precision}"
    single_process_megatron()
    chunks = build_model(cfg, cuda=torch.cuda.is_available())
    for module in chunks[0].modules():
        if isinstance(module, HybridCoreAttention):  # rho = 0.5 in every layer: KV heads alternate
            module.set_static([head % 2 == 0 for head in range(module.num_kv_heads)])
    params = sum(p.numel() for p in chunks[0].parameters())
    step = training_step(cfg, chunks, num_microbatches=micro_batches)
    times = interleaved({"step": step}, reps, warmup=2)  # warm-up compiles FlexAttention
    seconds = median(times, "step")
    sequences = micro_batches * cfg.train.micro_batch_size
    tokens = sequences * seq
    flops = hybrid_model_flops(cfg, 0.5, window, padded_vocab_size(cfg.model.vocab_size), sequences)
    achieved = flops / seconds / 1e12
    rows = [
        row(
            "gpu",
            f"hybrid model parameters (M), rho=0.5 KV heads SWA W={window}, T={seq}, {label}",
            params / 1e6,
            "report",
        ),
        row("gpu", f"hybrid model tokens/s, {label}", tokens / seconds, "report"),
        row("gpu", f"hybrid model achieved TFLOP/s (model FLOPs), {label}", achieved, "report"),
    ]
    if peak:
        target = ">= 0.45" if (backend, precision) == ("te", "bf16") else "report"
        rows.append(row("gpu", f"hybrid model MFU (peak {peak:.0f} TFLOP/s), {label}", achieved / peak, target))
    if torch.cuda.is_available():
        rows.append(
            row(
                "gpu",
                f"hybrid model peak allocated memory (GiB), {label}",
                torch.cuda.max_memory_allocated() / 2**30,
                "report",
            )
        )
        torch.cuda.reset_peak_memory_stats()
    del step, chunks
    return rows


# -- 2. attention kernels --------------------------------------------------------------------------


def bench_attention(tiny: bool, reps: int) -> list:
    from benchmarks.swa_kernel_bench import bench_kernels, bench_layers
    from megatron_ext.models.kernels import ideal_flop_ratio

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    window = 64 if tiny else 512
    rows = []
    for seq in (512,) if tiny else (4096, 8192):
        t = bench_kernels(seq, window, reps, device=device, dtype=dtype)
        for part, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
            rows.append(
                row(
                    "gpu",
                    f"SWA / FA {label}, T={seq}, W={window}, {str(dtype)[6:]}",
                    ratio(t, f"swa_{part}", f"fa_{part}"),
                    "report",
                    ideal_flop_ratio(seq, window),
                )
            )
    seq = 512 if tiny else 8192
    t = bench_layers(seq, window, reps, device=device, dtype=dtype)
    for name, label in (("gated", "gated (stage 1)"), ("mixed", "KV-head mixed rho=0.5")):
        rows.append(
            row(
                "gpu",
                f"{label} / FA layer fwd+bwd, T={seq}",
                ratio(t, f"{name}_fwdbwd", "full_fwdbwd"),
                "<= 1.28" if name == "gated" else "<= 0.66",
            )
        )
    return rows


# -- 3. MoE ----------------------------------------------------------------------------------------


def bench_moe(tiny: bool, reps: int) -> list:
    import dataclasses

    from benchmarks.moe_bench import bench_subnetworks, run_config, subnetwork_rows

    if tiny:
        cfg = run_config(seq_length=64, micro_batch_size=2)
    else:
        shape = dict(
            num_layers=8,
            hidden_size=1024,
            num_attention_heads=16,
            num_query_groups=4,
            ffn_hidden_size=2816,
            vocab_size=32000,
        )
        moe = dict(
            enabled=True, num_experts=64, top_k=8, expert_ffn_hidden_size=512, shared_expert_ffn_hidden_size=1024
        )
        cfg = run_config(shape=shape, moe=moe, seq_length=4096, micro_batch_size=2)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_length
    m = cfg.moe
    rows = []
    for backend in dict.fromkeys(b for b, _ in backends()):  # the GEMMs per expert, or one grouped GEMM (te)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend=backend))
        t = bench_subnetworks(reps, cfg)
        rows.append(
            row(
                "gpu",
                f"MoE tokens/s, {m.num_experts} experts of {m.expert_ffn_hidden_size}, top-{m.top_k}, EP=1, {backend}",
                tokens / median(t, "full"),
                "report",
            )
        )
        rows += [{**r, "benchmark": "gpu"} for r in subnetwork_rows(t, f" (MoE, one GPU, {backend})")]
    return rows


def write_results(out: Path, stamp: str, device: str, tiny: bool, rows: list, failures: list) -> None:
    from benchmarks.run import markdown

    out.mkdir(parents=True, exist_ok=True)
    record = {
        "date": stamp,
        "device": device,
        "torch": torch.__version__,
        "tiny": tiny,
        "rows": rows,
        "failed": failures,
    }
    (out / f"gpu-{stamp}.json").write_text(json.dumps(record, indent=1))
    (out / f"gpu-{stamp}.md").write_text(f"device: {device}\n\n" + markdown(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: check the code paths, on CPU too")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    parser.add_argument("--only", nargs="+", choices=["mfu", "attention", "moe"], default=["mfu", "attention", "moe"])
    parser.add_argument("--out", type=Path, default=None, help="write gpu-<date>.json and .md here")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        parser.error("no CUDA device: the GPU check needs one (use --tiny to check the code paths on CPU)")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}, python {platform.python_version()}", flush=True)
    benches = {
        "mfu": lambda: bench_mfu(args.tiny, args.reps, peak_tflops(args.peak_tflops)),
        "attention": lambda: bench_attention(args.tiny, args.reps),
        "moe": lambda: bench_moe(args.tiny, args.reps),
    }
    rows, failures = [], []
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    for name in args.only:
        try:
            part = benches[name]()
        except Exception as exc:  # report every part: one failure must not hide the others' figures
            failures.append(name)
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            import traceback

            traceback.print_exc()
            part = []
        for r in part:
            print(f"{r['metric']:<72} {r['value']:>12.4f}  {r['target']}", flush=True)
        rows += part
        if args.out:  # after every part: a time limit that stops a later part keeps these figures
            write_results(args.out, stamp, device, args.tiny, rows, failures)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    missed = [r["metric"] for r in rows if meets(r["value"], r["target"]) is False]
    if missed:
        print(f"targets missed: {missed}", flush=True)
    if failures:
        sys.exit(f"gpu check: {failures} failed")


if __name__ == "__main__":
    main()
