"""Make synchronous ``dist_checkpointing`` saves survive the stop signal that triggered them.

Megatron-Core 0.16.1's filesystem writer (``strategies/filesystem_async.py``) reports write
results through a queue owned by a ``multiprocessing.Manager`` server process, created on the
first save and kept for the life of the rank. torchrun stops workers with ``killpg(SIGTERM)``
and SLURM signals every process of a job step, so on preemption that server dies with the
signal, and the checkpoint saved in response fails with BrokenPipeError.

A Manager queue is only needed when the save runs in a separate (async) process; our saves are
synchronous, so the writer and the reader of the queue are the same process and a plain
``queue.Queue`` serves. This applies on GPU as well as on CPU.
"""

from __future__ import annotations

import queue

from megatron_ext.compat.cpu import SUPPORTED_MEGATRON_CORE as _EXPECTED


def use_in_process_write_results_queue() -> None:
    """Give Megatron's filesystem writer a process-local results queue (idempotent)."""
    from megatron.core import package_info
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if package_info.__version__ != _EXPECTED:
        raise RuntimeError(
            f"the checkpoint-writer patch was written for megatron-core {_EXPECTED}, found "
            f"{package_info.__version__}: re-check filesystem_async._get_write_results_queue"
        )
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
