"""The peak a rank's model FLOPs are compared against (MFU's denominator).

GPU: the vendor's dense (no structured sparsity) tensor-core peak for the training dtype, looked up
by device name; a GPU not in the table, or one training in fp32, is measured. CPU: measured at the
start of the run as the best of several rounds of a large fp32 matmul that every rank runs at the
same time (so ranks that share cores share the peak, as they share it in training), each round's
rate the mean over ranks. ``logging.peak_tflops_per_rank`` overrides both.

A measured peak is a lower bound of what the machine can do: on a machine busy with other work the
matmul runs slow, and a step that later runs faster would read as MFU above 100%. :class:`PeakFlops`
then raises the peak to the rate the step reached (and says so in the log): MFU never exceeds 1.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

# Dense bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (the larger SXM / OAM
# figure where a part has several; sparsity figures halved). Matched as substrings of
# torch.cuda.get_device_name(), most specific first.
GPU_BF16_PEAK_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("MI300X", 1307.4),
    ("MI325X", 1307.4),
    ("MI250X", 383.0),
)


def lookup_gpu_peak(name: str) -> Optional[float]:
    """Dense bf16 TFLOP/s of a GPU model name, or None when it is not in the table."""
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 0.5) -> float:
    """Best FLOP/s of ``size x size`` matmuls on ``device`` over about ``seconds``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2.0 * size**3
    torch.matmul(a, b)  # warm-up: thread pool, kernel selection
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * flops / (time.perf_counter() - start))
    return best


def peak_flops_per_rank(
    cuda: bool, dtype: torch.dtype, override_tflops: Optional[float] = None, comm_device: Optional[torch.device] = None
) -> Tuple[float, str]:
    """``(FLOP/s, how it was obtained)`` of one rank; a collective when it measures (every rank runs
    the matmul together, the mean is taken, so every rank reports the same peak)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "logging.peak_tflops_per_rank"
    if cuda:
        name = torch.cuda.get_device_name()
        tflops = lookup_gpu_peak(name) if dtype == torch.bfloat16 else None
        if tflops is not None:
            return tflops * 1e12, f"{name} data sheet, dense bf16"
        device, size, source = torch.device("cuda", torch.cuda.current_device()), 8192, f"measured on {name}"
    else:
        device, size, source = torch.device("cpu"), 1024, "measured fp32 matmul on CPU"
    best = 0.0
    for _ in range(PEAK_ROUNDS):
        if dist.is_initialized():
            dist.barrier()
        value = torch.tensor(
            [measure_matmul_peak(device, dtype, size, seconds=0.15)], dtype=torch.float64, device=comm_device or device
        )
        if dist.is_initialized():
            dist.all_reduce(value)
            value /= dist.get_world_size()
        best = max(best, float(value.item()))
    return best, f"{source}, best of {PEAK_ROUNDS} rounds"


PEAK_ROUNDS = 5
"""Rounds of the peak measurement; the best round counts (a busy moment spoils only its own round)."""


class PeakFlops:
    """The peak MFU divides by: ``flops`` per rank from ``source``; raised when a step beats it."""

    def __init__(self, flops: float, source: str, log: Callable[[str], None] = print):
        self.flops, self.source, self.log = flops, source, log

    def __str__(self) -> str:
        return f"{self.flops / 1e12:.3g} TFLOP/s per rank ({self.source})"

    def mfu(self, rank_flops: float) -> float:
        """``rank_flops / peak``, at most 1: a rate above the peak becomes the peak (logged)."""
        if rank_flops > self.flops:
            self.flops = rank_flops
            self.source = "raised to a step's rate, which beat the previous peak"
            self.log(f"mfu against {self}: the peak was measured low (a busy machine?)")
        return rank_flops / self.flops
