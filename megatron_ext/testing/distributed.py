"""Run a function on N spawned gloo ranks with Megatron's parallel state set up around it.

    results = run_distributed(body, world_size=2, sizes=ParallelSizes(tp=2), batch=batch)

``body`` must be importable by name (a module-level function); it runs on every rank between
``initialize_parallel_state`` and ``destroy_parallel_state`` and its return value (anything
``torch.save`` can write) comes back as ``results[rank]``.

Workers are spawned once per world size and reused across calls: spawning and importing
Megatron costs seconds, a task milliseconds. The rendezvous store is created in this process on
a free port (port 0: no race with other jobs). When a rank raises, its traceback is re-raised
here as :class:`DistributedTaskError`; a task that runs past its timeout (a rank stuck in a
collective) raises :class:`DistributedTaskTimeout`. Either way the pool is discarded, since a
gloo group after a failed collective is not trustworthy; the next call spawns a fresh one.
"""

from __future__ import annotations

import atexit
import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron_ext.parallel.state import ParallelSizes

_STORE_HOST = "127.0.0.1"
_FAILURE_GRACE_S = 3.0


class DistributedTaskError(RuntimeError):
    """A rank raised; the message holds that rank's traceback."""


class DistributedTaskTimeout(TimeoutError):
    """The task did not finish on every rank in time."""


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker_main(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    from megatron_ext.compat import enable_cpu_support
    from megatron_ext.parallel.state import destroy_parallel_state, initialize_parallel_state

    torch.set_num_threads(1)
    enable_cpu_support()
    store = dist.TCPStore(_STORE_HOST, port, world_size, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test process died: do not linger
                return
            continue
        if task is None:
            break
        fn, kwargs, sizes, seed = task
        try:
            if sizes is not None:
                initialize_parallel_state(sizes, seed=seed)
            output = fn(**kwargs)
            results.put((rank, True, _to_bytes(output)))
        except BaseException:  # report everything, including assertion failures
            results.put((rank, False, traceback.format_exc()))
        finally:
            try:
                destroy_parallel_state()
            except BaseException:
                pass
    dist.destroy_process_group()


class _WorkerPool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.store = dist.TCPStore(_STORE_HOST, 0, world_size + 1, is_master=True, wait_for_workers=False)
        self.results = ctx.Queue()
        self.task_queues = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, self.store.port, self.task_queues[rank], self.results),
                daemon=False,  # workers spawn helpers of their own (dist_checkpointing)
            )
            for rank in range(world_size)
        ]
        for proc in self.procs:
            proc.start()

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def run(self, fn, kwargs, sizes: ParallelSizes, seed: int, timeout: float) -> list:
        for q in self.task_queues:
            q.put((fn, kwargs, sizes, seed))
        outputs: list = [None] * self.world_size
        done = 0
        failure: Optional[str] = None
        deadline = time.monotonic() + timeout
        while done < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, payload = self.results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not self.alive():
                    failure = failure or "a worker process died (see its output above)"
                    break
                continue
            done += 1
            if ok:
                outputs[rank] = _from_bytes(payload)
            else:
                failure = (failure + "\n" if failure else "") + f"rank {rank} raised:\n{payload}"
                # Give the other ranks a moment to report, then stop waiting for them.
                deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
        if failure is not None:
            raise DistributedTaskError(f"{fn.__module__}.{fn.__qualname__} failed on {sizes}:\n{failure}")
        if done < self.world_size:
            raise DistributedTaskTimeout(
                f"{fn.__module__}.{fn.__qualname__} did not finish on all {self.world_size} ranks "
                f"within {timeout:.0f} s ({done} finished): a rank is probably stuck in a collective."
            )
        return outputs

    def close(self) -> None:
        for q in self.task_queues:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


_pools: dict[int, _WorkerPool] = {}


def shutdown_pools() -> None:
    """Stop every worker pool (registered at exit)."""
    while _pools:
        _pools.popitem()[1].close()


atexit.register(shutdown_pools)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    sizes: Optional[ParallelSizes] = ParallelSizes(),
    *,
    seed: int = 1234,
    timeout: float = 180.0,
    **kwargs: Any,
) -> list:
    """Run ``fn(**kwargs)`` on ``world_size`` gloo ranks under ``sizes``; return per-rank outputs.

    ``sizes=None`` leaves Megatron's parallel state to ``fn`` (e.g. a whole training run).
    """
    if sizes is not None:
        sizes.data_parallel_size(world_size)  # fail here, not in the workers, on sizes that cannot fit
    pool = _pools.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        pool = _pools[world_size] = _WorkerPool(world_size)
    try:
        return pool.run(fn, kwargs, sizes, seed, timeout)
    except BaseException:
        _pools.pop(world_size, None)
        pool.close()
        raise
