"""A rank stuck mid-step ends the job in bounded time, naming who is behind and where.

A stuck rank (a hung data read, a deadlock, a wedged device) blocks its peers in their next
collective, silently, until the process group's timeout. Each rank runs a :class:`StepWatchdog`
thread; the training loop marks the phases of every step (:meth:`StepWatchdog.enter`). A phase that
runs longer than ``factor`` times its median duration so far (and at least ``min_seconds``; only
once it has ``WARMUP`` earlier durations, so that first steps, compilation and the first
checkpoint are never judged) makes the watchdog:

1. read every rank's last phase from the job's store (each rank publishes its step and phase
   there at every phase change) and name the rank(s) behind: the earliest step and phase;
2. dump the Python stack of every thread of its own process (``faulthandler``);
3. exit the process with :data:`HANG_EXIT_STATUS` (75, EX_TEMPFAIL: "try again"), which the
   launchers pass on and ``slurm/launch.sh`` answers with a requeue; the run resumes from its last
   checkpoint.

Every rank's watchdog fires (the stuck rank's phase overruns too, and its stack shows where it
hangs); each reports once.
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import defaultdict, deque
from typing import Callable, Dict, List, Optional, Tuple

HANG_EXIT_STATUS = 75
PHASES = ("update", "metrics", "evaluate", "log", "checkpoint", "save")
"""The phases of a training step, in the order a step runs them (a rank in an earlier one is behind):
forward, backward and optimizer update; the step's metrics (capability callbacks); a validation
evaluation; the metrics record (its collectives); the stop-signal agreement; a checkpoint save."""
WARMUP = 3
"""Durations of a phase seen before it can overrun."""
HISTORY = 50
"""Durations of a phase its median is taken over (the most recent)."""
_KEY = "megatron_ext/watchdog/rank{}"


def _default_store():
    """The store of the default process group (None without one)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


class StepWatchdog:
    """Watches the phases of the training steps of one rank (see the module docstring)."""

    def __init__(
        self,
        factor: float,
        min_seconds: float,
        rank: int = 0,
        world_size: int = 1,
        store=None,
        log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
        poll: float = 0.2,
        exit_fn: Callable[[int], None] = os._exit,
    ):
        self.factor, self.min_seconds = factor, min_seconds
        self.rank, self.world_size, self.store = rank, world_size, store
        self.log, self.poll, self.exit_fn = log, poll, exit_fn
        self.durations: Dict[str, deque] = defaultdict(lambda: deque(maxlen=HISTORY))
        self.current: Optional[Tuple[int, str, float]] = None  # (step, phase, start)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def for_run(cls, factor: float, min_seconds: float) -> StepWatchdog:
        """The started watchdog of this rank of the job (one that watches nothing when ``factor`` is 0)."""
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        watchdog = cls(factor, min_seconds, rank, world, _default_store() if factor else None)
        if factor:
            watchdog.start()
        return watchdog

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def enter(self, phase: str, step: int) -> None:
        """Phase ``phase`` (one of :data:`PHASES`) of step ``step`` begins, and the previous phase ends."""
        if not self.factor:
            return
        now = time.monotonic()
        with self._lock:
            if self.current is not None:
                self.durations[self.current[1]].append(now - self.current[2])
            self.current = (step, phase, now)
        self._publish(f"{step} {phase}")

    def leave(self) -> None:
        """The current phase ends and nothing is watched until the next :meth:`enter`."""
        with self._lock:
            if self.current is not None:
                self.durations[self.current[1]].append(time.monotonic() - self.current[2])
            self.current = None

    def _publish(self, value: str) -> None:
        if self.store is not None and self.world_size > 1:
            try:
                self.store.set(_KEY.format(self.rank), value)
            except RuntimeError:
                self.store = None  # a store that went away: report this rank's view alone

    def deadline(self, phase: str) -> Optional[float]:
        """Seconds phase ``phase`` may run, or None while it has too little history."""
        history = self.durations.get(phase)
        if history is None or len(history) < WARMUP:
            return None
        return max(self.min_seconds, self.factor * statistics.median(history))

    def overrun(self) -> Optional[str]:
        """The report when the current phase has run past its deadline, else None."""
        with self._lock:
            if self.current is None:
                return None
            step, phase, start = self.current
            limit, median = self.deadline(phase), statistics.median(self.durations[phase] or [0.0])
        elapsed = time.monotonic() - start
        if limit is None or elapsed <= limit:
            return None
        return (
            f"watchdog: rank {self.rank}: phase {phase!r} of step {step} has run {elapsed:.1f} s, over "
            f"{self.factor:g} x its median {median:.3g} s (and at least {self.min_seconds:g} s); "
            + self.behind()
            + f"; Python stacks of rank {self.rank} follow; exiting with status {HANG_EXIT_STATUS} "
            "so that the job is requeued and resumes from its last checkpoint"
        )

    def behind(self) -> str:
        """Which rank(s) are behind, by the phases the ranks last published (the earliest step and
        phase); this rank's own view where the store cannot say."""
        if self.store is None or self.world_size == 1:
            return "no other rank to compare with"
        where: Dict[int, Tuple[int, int, str]] = {}
        keys = [_KEY.format(r) for r in range(self.world_size)]
        for rank, key in enumerate(keys):
            try:
                if self.store.check([key]):
                    step, phase = self.store.get(key).decode().split(" ", 1)
                    index = PHASES.index(phase) if phase in PHASES else -1
                    where[rank] = (int(step), index, phase)
            except (RuntimeError, ValueError):
                continue
        if not where:
            return "the other ranks' phases are unknown"
        earliest = min((step, index) for step, index, _ in where.values())
        lagging = sorted(r for r, (step, index, _) in where.items() if (step, index) == earliest)
        silent = sorted(set(range(self.world_size)) - set(where))
        step, _, phase = where[lagging[0]]
        text = (
            f"rank {lagging[0]} is behind" if len(lagging) == 1 else f"ranks {', '.join(map(str, lagging))} are behind"
        )
        text += f", in phase {phase!r} of step {step}"
        ahead: List[str] = [
            f"rank {r}: {where[r][2]!r} of step {where[r][0]}" for r in sorted(where) if r not in lagging
        ]
        if ahead:
            text += f" (the others: {'; '.join(ahead[:8])}{'; ...' if len(ahead) > 8 else ''})"
        if silent:
            text += f"; no phase from rank(s) {', '.join(map(str, silent[:8]))}"
        return text

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll):
            report = self.overrun()
            if report is None:
                continue
            self.log(report)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            self.exit_fn(HANG_EXIT_STATUS)
            return
