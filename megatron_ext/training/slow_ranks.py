"""Slow ranks (``logging.slow_rank_threshold``): which rank holds the others back, and by how much.

In synchronous training every rank's wall time per step is the same: the fast ranks wait for the
slow one inside a collective. What differs is the *busy* time, the wall time less the waiting. The
detector measures the waiting at two timed barriers per step: at the start of the step (it absorbs
the skew of the previous step's tail: callback hooks, logging) and just before the gradient
reduction (it absorbs the skew of data loading, callback hooks before the step and forward /
backward compute, which under data parallelism meet no collective before the reduction). Every
``logging.log_interval`` steps one all-gather brings every rank's busy time; the slowest rank, its
busy time and its ratio to the median go into the metrics, and a ratio above the threshold is a
WARNING in the log. Skew absorbed by other collectives (tensor- and expert-parallel ones inside
the forward) shows as waiting elsewhere and is not attributed.

Megatron-Core's ``StragglerDetector`` times CUDA events and is a process-wide singleton with a
control port; this is the same idea (per-rank time, min / max over ranks) for CPU and GPU.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist


class SlowRankDetector:
    """Per-rank busy time between logged steps, from the waits at the detector's barriers."""

    def __init__(self, threshold: float, model_config, device: torch.device, log: Callable[[str], None]):
        self.threshold, self.device, self.log = threshold, device, log
        self.waited, self.steps = 0.0, 0
        self.interval_start: Optional[float] = None  # at the first step
        finalize = model_config.finalize_model_grads_func

        def barrier_then_finalize(*args, **kwargs):
            self.barrier()
            return finalize(*args, **kwargs)

        model_config.finalize_model_grads_func = barrier_then_finalize

    def barrier(self) -> None:
        """A barrier over the world; the time this rank waits in it is not busy time."""
        start = time.perf_counter()
        dist.barrier()
        self.waited += time.perf_counter() - start

    def begin_step(self) -> None:
        if self.interval_start is None:
            self.interval_start = time.perf_counter()
        self.barrier()
        self.steps += 1

    def interval_metrics(self, rank0: bool) -> Dict[str, float]:
        """``slow_rank/rank``, ``slow_rank/busy_ms`` (its mean busy time per step), ``slow_rank/median_ms``
        and ``slow_rank/ratio`` over the interval since the last call (an all-gather over the world);
        rank 0 logs a WARNING when the ratio exceeds the threshold."""
        now = time.perf_counter()
        busy = (now - self.interval_start - self.waited) / max(self.steps, 1)
        local = torch.tensor([busy], dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        per_rank = torch.cat(gathered)
        slowest = int(per_rank.argmax())
        median = float(per_rank.median())  # the lower middle value for an even count (torch's median)
        ratio = float(per_rank[slowest]) / median if median > 0 else float("inf")
        if rank0 and ratio > self.threshold:
            self.log(
                f"WARNING: rank {slowest} is slow: busy {1e3 * float(per_rank[slowest]):.1f} ms per step, "
                f"{ratio:.2f}x the median rank's {1e3 * median:.1f} ms (logging.slow_rank_threshold="
                f"{self.threshold})"
            )
        self.waited, self.steps = 0.0, 0
        self.interval_start = time.perf_counter()
        return {
            "slow_rank/rank": slowest,
            "slow_rank/busy_ms": 1e3 * float(per_rank[slowest]),
            "slow_rank/median_ms": 1e3 * median,
            "slow_rank/ratio": ratio,
        }
