"""The step time breakdown (``logging.timers``) through Megatron-Core's ``Timers``.

Megatron's schedule and optimizer time themselves when their config holds a ``Timers`` object
(``forward-backward``, ``all-grads-sync``, ``forward-compute`` / ``backward-compute`` at level 2);
the loop adds what only it sees (``data``, ``callbacks``, ``optimizer``, ``loss-reduce`` and ``step``, the whole
iteration from the first callback hook to the last). Timers are read locally after each step and
summed over the logging interval; at a logged step one all-gather gives every rank's sums, and the
metrics are the slowest rank's mean per step, in milliseconds (Megatron-LM's ``max`` option):

    time/step = time/data + time/forward_backward + time/optimizer + time/loss_reduce + time/callbacks
                + (the rest: zeroing the gradient buffers, FLOP accounting)

``time/grad_sync`` is part of ``time/forward_backward`` (Megatron stops that timer after the
gradient reduction), ``time/forward`` and ``time/backward`` are too. Off (level 0), no timer exists
and the schedule, optimizer and loop skip every timing call.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.distributed as dist

METRICS = {
    "step": ("step", 1),
    "data": ("data", 1),
    "forward-backward": ("forward_backward", 1),
    "all-grads-sync": ("grad_sync", 1),
    "optimizer": ("optimizer", 1),
    "loss-reduce": ("loss_reduce", 1),
    "callbacks": ("callbacks", 1),
    "forward-compute": ("forward", 2),
    "backward-compute": ("backward", 2),
}
"""Timer name -> (``time/<key>`` metric, Megatron log level)."""

TRAIN_STEP_TIMERS = (
    "forward-backward",
    "all-grads-sync",
    "optimizer",
    "loss-reduce",
    "forward-compute",
    "backward-compute",
)
"""The timers that run inside the training step (read right after it, so that a validation pass the
loop or a callback runs later does not count as training)."""


class StepTimers:
    """Megatron ``Timers`` at ``level`` (1 or 2), installed on the model chunks' and optimizers' configs."""

    def __init__(self, level: int, model_configs: List, optimizer):
        from megatron.core.timers import Timers

        self.timers = Timers(log_level=level, log_option="max")
        self.names = [name for name, (_, lvl) in METRICS.items() if lvl <= level]
        for name in self.names:
            self.timers(name, log_level=METRICS[name][1])  # create them all: reads never meet a missing one
        # Megatron's optimizers time their phases too (the CPU AdamW has no config: ``optimizer`` alone).
        optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
        for config in [*model_configs, *(opt.config for opt in optimizers if hasattr(opt, "config"))]:
            config.timers = self.timers
            # No barrier before the level-1 timers: timing must not change how ranks synchronize.
            config.barrier_with_L1_time = False
        self.step_seconds: Dict[str, float] = dict.fromkeys(self.names, 0.0)
        self.interval = dict.fromkeys(self.names, 0.0)
        self.steps = 0

    def __call__(self, name: str, log_level=None):
        """Megatron's ``timers(name)`` (what ``train_step`` starts and stops)."""
        return self.timers(name, log_level)

    @contextlib.contextmanager
    def timed(self, name: str):
        self.timers(name).start()
        try:
            yield
        finally:
            self.timers(name).stop()

    def begin_step(self) -> None:
        """Drop what ran between steps (logging, validation, checkpoints) and start ``step``."""
        for name in self.names:
            self.timers(name).reset()
        self.timers("step").start()

    def read(self, names) -> None:
        """Move the elapsed time of ``names`` into this step's values."""
        for name in names:
            if name in self.step_seconds:
                self.step_seconds[name] += self.timers(name).elapsed(reset=True)

    def end_step(self) -> None:
        self.timers("step").stop()
        self.read(["step", "data", "callbacks"])
        for name, seconds in self.step_seconds.items():
            self.interval[name] += seconds
            self.step_seconds[name] = 0.0
        self.steps += 1

    def interval_metrics(self, device: torch.device) -> Dict[str, float]:
        """``time/<key>``: the slowest rank's mean milliseconds per step since the last call (an
        all-gather over the world)."""
        local = torch.tensor([self.interval[name] for name in self.names], dtype=torch.float64, device=device)
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        slowest = torch.stack(gathered).max(dim=0).values / max(self.steps, 1)
        self.interval = dict.fromkeys(self.names, 0.0)
        self.steps = 0
        return {f"time/{METRICS[name][0]}": 1e3 * float(v) for name, v in zip(self.names, slowest)}


def progress(record: Dict[str, float]) -> str:
    """The log line's part: ``time ms step 120 = data 1 + fwd-bwd 100 + opt 15 + loss 1 + cb 3 (grad sync 9)``."""
    if "time/step" not in record:
        return ""
    parts = [
        ("data", "data"),
        ("fwd-bwd", "forward_backward"),
        ("opt", "optimizer"),
        ("loss", "loss_reduce"),
        ("cb", "callbacks"),
    ]
    terms = " + ".join(f"{label} {record[f'time/{key}']:.0f}" for label, key in parts)
    return f" | time ms step {record['time/step']:.0f} = {terms} (grad sync {record['time/grad_sync']:.0f})"
