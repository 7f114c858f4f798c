"""What the benchmarks share: side-by-side timing, ratio rows and a one-process Megatron setup.

Timing is interleaved: every repetition runs each case once, in an order that alternates between
repetitions, so that a change in machine load during the benchmark hits all cases alike. A ratio
A / B is the median over repetitions of (time of A / time of B) within the same repetition, which
cancels slow drifts better than a ratio of two medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional

import torch

Row = Dict[str, object]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn`` (``time.perf_counter``; GPU work waited for)."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def interleaved(cases: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1) -> Dict[str, List[float]]:
    """``reps`` timed calls of each case after ``warmup`` untimed ones, cases alternating."""
    if reps < 1:
        raise ValueError(f"reps={reps}: use at least one repetition")
    names = list(cases)
    for _ in range(warmup):  # first-touch allocations, thread pools, lazy initialisation
        for name in names:
            cases[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            times[name].append(seconds(cases[name]))
    return times


def ratio(times: Mapping[str, List[float]], a: str, b: str) -> float:
    """Median over repetitions of ``time[a] / time[b]`` (same repetition)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def median(times: Mapping[str, List[float]], name: str) -> float:
    return statistics.median(times[name])


def row(benchmark: str, metric: str, value: float, target: str = "", ideal: Optional[float] = None) -> Row:
    """One line of the report; ``target`` is text (``"<= 1.05"``, ``"report"``)."""
    out: Row = {"benchmark": benchmark, "metric": metric, "value": float(value), "target": target}
    if ideal is not None:
        out["ideal"] = float(ideal)
    return out


def meets(value: float, target: str) -> Optional[bool]:
    """Whether ``value`` meets a ``"<= x"`` / ``">= x"`` target; None for other targets."""
    parts = target.split()
    if len(parts) != 2 or parts[0] not in ("<=", ">="):
        return None
    bound = float(parts[1])
    return value <= bound if parts[0] == "<=" else value >= bound


def command_line(run: Callable[[int], List[Row]], doc: str, default_reps: int = 5) -> None:
    """The command line of one benchmark module: ``--reps N``, then its rows printed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=default_reps, help="timed repetitions of each case")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: use at least 1")
    for r in run(args.reps):
        print(f"{r['metric']:<82} {r['value']:>12.4f}  {r['target']}")


def single_process_megatron() -> None:
    """A world of one rank (gloo on CPU, NCCL on GPU) with Megatron's parallel state of size 1 (idempotent)."""
    from megatron.core import parallel_state

    from megatron_ext.compat import enable_cpu_support
    from megatron_ext.parallel import ParallelSizes, initialize_parallel_state
    from megatron_ext.parallel.state import init_distributed

    enable_cpu_support()  # a no-op where CUDA is available
    if not torch.distributed.is_initialized():
        init_distributed(cuda=torch.cuda.is_available())
    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel_state(ParallelSizes())


def training_step(cfg, model_chunks: list, num_microbatches: int = 1) -> Callable[[], float]:
    """A function that runs one optimizer step of ``model_chunks`` (bare GPTModels, wrapped here in
    Megatron DDP with the run's optimizer) on a fixed batch of the synthetic dataset (this
    data-parallel rank's share, on the model's device); returns the loss."""
    from megatron.core import parallel_state

    from megatron_ext.data.synthetic import SyntheticMotifDataset, step_micro_batches
    from megatron_ext.optim import build_optimizer
    from megatron_ext.parallel.state import comm_device
    from megatron_ext.training.ddp import wrap_with_ddp
    from megatron_ext.training.loop import optimizer_config
    from megatron_ext.training.step import train_step

    opt_config = optimizer_config(cfg, torch.cuda.is_available())
    model = wrap_with_ddp(model_chunks, use_distributed_optimizer=opt_config.use_distributed_optimizer)
    optimizer = build_optimizer(opt_config, model)
    seq, mbs = cfg.data.seq_length, cfg.train.micro_batch_size
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    dataset = SyntheticMotifDataset(cfg.model.vocab_size, seq, cfg.train.seed)
    batches = list(
        step_micro_batches(dataset, 0, num_microbatches * mbs * dp_size, mbs, dp_rank, dp_size, device=comm_device())
    )

    def step() -> float:
        result = train_step(
            model, optimizer, iter(batches), num_microbatches=num_microbatches, seq_length=seq, micro_batch_size=mbs
        )
        return result.loss

    return step
