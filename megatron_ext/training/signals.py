"""Preemption: SIGTERM / SIGUSR1 / SIGINT ask the run to checkpoint at the next step boundary and exit 0.

SLURM sends ``--signal=USR1@T`` before the time limit and SIGTERM on preemption / requeue; Ctrl-C
sends SIGINT (to the launcher, which passes it on, or to every process of the terminal's group).
The handler only sets a flag; the loop asks every rank at each step end (one all-reduce of a flag),
so all ranks stop after the same step even if the signal reached them at different times. A second
SIGINT means "now": the rank exits at once with status 130, without a checkpoint (the previous
complete one stays the latest: saves are atomic).
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

from megatron_ext.parallel.state import comm_device

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self):
        self.received: int | None = None
        self.interrupted = False
        self._previous = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.interrupted:
            os.write(sys.stderr.fileno(), b"second interrupt: exiting now, without a checkpoint\n")
            os._exit(128 + signal.SIGINT)
        self.interrupted = self.interrupted or signum == signal.SIGINT
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank if any rank received a stop signal (collective)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=comm_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
