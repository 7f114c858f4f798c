"""Make synchronous ``dist_checkpointing`` saves survive the stop signal that triggered them.

Megatron-Core 0.16.1's filesystem writer (``strategies/filesystem_async.py``) reports write
results through a queue owned by a ``multiprocessing.Manager`` server process, created on the
first save and kept for the life of the rank. torchrun stops workers with ``killpg(SIGTERM)``
and SLURM signals every process of a job step, so on preemption that server dies with the
signal, and the checkpoint saved in response fails with BrokenPipeError.

A Manager queue is only needed when the save runs in a separate (async) process; our saves are
synchronous, so the writer and the reader of the queue are the same process and a plain
``queue.Queue`` serves. This applies on GPU as well as on CPU.

The same save forks writer processes (``write_preloaded_data_multiproc`` starts one per bucket and
waits for them). A rank killed mid-save (SIGKILL, OOM) leaves them blocked on queues nobody reads,
for ever: ``writer_start`` runs first in each writer, given the pid of the rank that forked it (the
checkpoint manager passes :func:`megatron_ext.launch.orphans.die_with_parent`).
"""

from __future__ import annotations

import functools
import os
import queue
from typing import Callable, Optional

from megatron_ext.compat.cpu import SUPPORTED_MEGATRON_CORE as _EXPECTED


def use_in_process_write_results_queue(writer_start: Optional[Callable[[Optional[int]], object]] = None) -> None:
    """Give Megatron's filesystem writer a process-local results queue, and make each writer process
    call ``writer_start(pid of the forking rank)`` first (idempotent)."""
    from megatron.core import package_info
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if package_info.__version__ != _EXPECTED:
        raise RuntimeError(
            f"the checkpoint-writer patch was written for megatron-core {_EXPECTED}, found "
            f"{package_info.__version__}: re-check filesystem_async._get_write_results_queue and "
            "FileSystemWriterAsync.write_preloaded_data"
        )
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
    writer = filesystem_async.FileSystemWriterAsync
    if writer_start is not None and not getattr(writer.write_preloaded_data, "starts_with", None):
        os.register_at_fork(before=_remember_forking_process)
        writer.write_preloaded_data = staticmethod(_starting_with(writer_start, writer.write_preloaded_data))


_forked_by = {"pid": None}
"""The pid of the process that last forked, as a forked child sees it: its parent at fork time."""


def _remember_forking_process() -> None:
    _forked_by["pid"] = os.getpid()


def _starting_with(start, write):
    """``write`` (run in a writer process the rank forked), calling ``start(rank's pid)`` first."""

    @functools.wraps(write)
    def write_started(*args, **kwargs):
        start(_forked_by["pid"])
        return write(*args, **kwargs)

    write_started.starts_with = start
    return write_started
