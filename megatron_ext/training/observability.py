"""What a long run reports beside its training metrics, behind one object the loop calls.

Each part is off unless its ``logging`` key turns it on, and off it costs nothing per step:

=======================  =======================================================================
``logging.timers``       step time breakdown through Megatron-Core's timers (``time/...``)
                         (:mod:`~megatron_ext.training.timers`)
``logging.norm_interval``  parameter norm, per-layer parameter and gradient norms (``norm/...``)
                         (:mod:`~megatron_ext.training.norms`)
``logging.slow_rank_threshold``  the slowest rank's busy time and ratio to the median, a WARNING
                         above the threshold (``slow_rank/...``, :mod:`~megatron_ext.training.slow_ranks`)
``logging.profile``      a torch.profiler window with named regions (:mod:`~megatron_ext.training.profiler`)
``logging.wandb``        Weights & Biases (:mod:`~megatron_ext.training.wandb_logger`)
``logging.memory_snapshot_step``  GPU: a CUDA memory snapshot at a step and on out-of-memory
=======================  =======================================================================

On GPU every logged step also has each rank's current and peak allocated and reserved memory
(``mem/allocated_gib`` ..., lists by rank); on CPU the peak resident set (``mem/peak_gib``) as
before.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_ext.training.profiler import ProfilerWindow
from megatron_ext.training.timers import TRAIN_STEP_TIMERS, StepTimers, progress

_NO_TIMING = contextlib.nullcontext()


class Observability:
    """Built once the model and optimizer exist; every method is called on every rank."""

    def __init__(
        self, cfg, run_dir: Path, model: List, optimizer, device: torch.device, cuda: bool, log: Callable[[str], None]
    ):
        from megatron.core.utils import get_model_config

        lg = cfg.logging
        self.cfg, self.run_dir, self.device, self.cuda, self.log = cfg, Path(run_dir), device, cuda, log
        self.rank = dist.get_rank()
        model_configs = [get_model_config(chunk) for chunk in model]
        self.timers = StepTimers(lg.timers, model_configs, optimizer) if lg.timers else None
        self.norms = None
        if lg.norm_interval:
            from megatron_ext.training.norms import NormTracker

            has_experts = model_configs[0].num_moe_experts is not None
            self.norms = NormTracker(model, cfg.model.num_layers, has_experts, device)
        self.slow_ranks = None
        if lg.slow_rank_threshold is not None:
            from megatron_ext.training.slow_ranks import SlowRankDetector

            self.slow_ranks = SlowRankDetector(lg.slow_rank_threshold, model_configs[0], device, self.log_rank0)
        self.profiler = ProfilerWindow(lg.profile, self.rank, self.run_dir, model, log)
        self.wandb = None
        if lg.wandb.mode != "disabled" and self.rank == 0:
            from megatron_ext.training.wandb_logger import WandbLogger

            self.wandb = WandbLogger(cfg, self.run_dir)
        self.snapshot_step = lg.memory_snapshot_step if cuda else None
        if self.snapshot_step is not None:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def log_rank0(self, line: str) -> None:
        if self.rank == 0:
            self.log(line)

    # Per step.

    def begin_step(self, step: int) -> None:
        """Before the callbacks' ``on_step_begin`` of step ``step`` (1-based)."""
        self.profiler.begin_step(step)
        if self.slow_ranks is not None:
            self.slow_ranks.begin_step()
        if self.timers is not None:
            self.timers.begin_step()

    def timed(self, name: str):
        """A context that times a region of the loop as timer ``name`` (``data``, ``callbacks``)."""
        return _NO_TIMING if self.timers is None else self.timers.timed(name)

    def after_train_step(self) -> None:
        """Right after the forward, backward and optimizer update."""
        if self.timers is not None:
            self.timers.read(TRAIN_STEP_TIMERS)

    def end_step(self, step: int) -> Dict[str, object]:
        """After the callbacks' ``on_step_end``; the norms at their interval (a collective)."""
        if self.timers is not None:
            self.timers.end_step()
        self.profiler.end_step(step)
        if step == self.snapshot_step:
            self.memory_snapshot(f"step{step}")
        interval = self.cfg.logging.norm_interval
        return self.norms.metrics() if self.norms is not None and step % interval == 0 else {}

    # Per logged step.

    def interval_metrics(self) -> Dict[str, object]:
        """The metrics gathered over ranks every ``logging.log_interval`` steps (collectives)."""
        record: Dict[str, object] = {}
        if self.timers is not None:
            record.update(self.timers.interval_metrics(self.device))
        if self.slow_ranks is not None:
            record.update(self.slow_ranks.interval_metrics(self.rank == 0))
        if self.cuda:
            record.update(gpu_memory(self.device))
        return record

    def write(self, record: Dict[str, object]) -> None:
        """A written record also goes to W&B."""
        if self.wandb is not None:
            self.wandb.log(record)

    @staticmethod
    def progress(record: Dict[str, object]) -> str:
        """What the progress line adds: the time breakdown and the slowest rank."""
        line = progress(record)
        if "slow_rank/ratio" in record:
            line += f" | slowest rank {record['slow_rank/rank']} ({record['slow_rank/ratio']:.2f}x median)"
        return line

    def memory_snapshot(self, tag: str) -> Optional[Path]:
        """GPU: the allocator's history so far, for pytorch.org/memory_viz."""
        path = self.run_dir / "memory" / f"rank{self.rank}.{tag}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        self.log(f"rank {self.rank}: CUDA memory snapshot written to {path}")
        return path

    def close(self, final_step: int) -> None:
        """However the run ends: the profiler's trace, the snapshot of an out-of-memory error, W&B."""
        self.profiler.close()
        error = sys.exc_info()[1]
        if self.snapshot_step is not None and isinstance(error, torch.cuda.OutOfMemoryError):
            self.memory_snapshot("oom")
        if self.wandb is not None:
            self.wandb.finish(final_step)


def gpu_memory(device: torch.device) -> Dict[str, List[float]]:
    """Each rank's current and peak allocated and reserved memory, GiB (an all-gather)."""
    local = (
        torch.tensor(
            [
                torch.cuda.memory_allocated(device),
                torch.cuda.max_memory_allocated(device),
                torch.cuda.memory_reserved(device),
                torch.cuda.max_memory_reserved(device),
            ],
            dtype=torch.float64,
            device=device,
        )
        / 2**30
    )
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    by_rank = torch.stack(gathered).T.tolist()  # [4, world]
    names = ("allocated_gib", "peak_allocated_gib", "reserved_gib", "peak_reserved_gib")
    return {f"mem/{name}": [round(v, 4) for v in values] for name, values in zip(names, by_rank)}
