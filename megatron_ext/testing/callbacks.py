"""Callbacks that tests use to drive the real training loop."""

import os
import signal

from megatron_ext.capability import Callback
from megatron_ext.parallel import load_full_named_tensors


class StartFrom(Callback):
    """Load the same full weights into any layout before the first step (pipeline stages and
    expert-parallel ranks draw different initialization streams)."""

    name = "start_from"

    def __init__(self, weights):
        self.weights = weights

    def on_train_start(self, ctx):
        if ctx.step == 0:
            for chunk in ctx.model:
                load_full_named_tensors(chunk, self.weights)


class PreemptAfter(Callback):
    """Send this rank SIGUSR1 after a given step, as SLURM does before a time limit."""

    name = "preempt_after"

    def __init__(self, step):
        self.step = step

    def on_step_end(self, ctx, result):
        if ctx.step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return {}
