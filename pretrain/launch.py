"""Start the ranks of one node, as torchrun does, after checking the run first.

    python -m pretrain.launch [torchrun options] -m pretrain.train --config configs/NAME.yaml [...]

Takes torchrun's options and runs torch's elastic agent in this process. Before any worker starts
it loads the config and checks it for the job's world size (``--nnodes`` x ``--nproc-per-node``):
a bad config, a ``--launcher`` other than torchrun / auto, or a run directory another job holds
(:mod:`megatron_ext.training.runlock`) prints one error block and exits 2, with no traceback. A worker that fails is
reported in one line (its own message is above it) and the exit status is the worker's. Also:

* SIGUSR1 is handled like SIGTERM (default ``--signals-to-handle`` includes it): the launcher
  passes it to the ranks, which checkpoint after their current step and exit; then it exits 0.
  Plain torchrun dies of SIGUSR1 and takes its ranks down without a checkpoint.
* SIGINT (Ctrl-C) too: the ranks checkpoint and stop; a second Ctrl-C ends them at once.
* The workers die with this process (``megatron_ext/launch/orphans.py``): killed, it leaves no rank
  training unsupervised.
* ``OMP_NUM_THREADS`` defaults to 1 per rank when several ranks share the node (torchrun's default,
  without its warning).
* The agent's own log lines are hidden unless ``--verbose`` (or ``MEGATRON_EXT_VERBOSE=1``).

``torchrun -m pretrain.train ...`` keeps working; this adds the checks and the quiet failure.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

from megatron_ext.launch.orphans import LAUNCHER_PID_ENV
from megatron_ext.quiet import VERBOSE_ENV

STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
CHECKED_MODULES = ("pretrain.train",)


def _world_size(args) -> Optional[int]:
    """Ranks of the job when they are fixed (``--nnodes N``), else None (elastic node counts)."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    low, high = parse_min_max_nnodes(args.nnodes)
    return low * determine_local_world_size(args.nproc_per_node) if low == high else None


def _check_training_args(script_args: List[str], world_size: Optional[int]) -> int:
    """0 when the training command and its config are fine for ``world_size`` ranks; else print the
    problems and return the exit status."""
    import torch

    from megatron_ext.config import ConfigError
    from megatron_ext.run import check_run, load_config
    from megatron_ext.training.preflight import check_inputs
    from megatron_ext.training.runlock import RunDirectoryError, holder
    from pretrain.train import parse_args

    args = parse_args(script_args)  # argparse's own message and status 2 on bad options
    if args.launcher not in ("auto", "torchrun"):
        print(
            f"error: --launcher {args.launcher}, but this launcher starts the ranks as torchrun does: "
            "use --launcher torchrun (or auto), or start the ranks with "
            + ("mpirun / srun --mpi=pmix" if args.launcher == "mpi" else "srun")
            + " instead of python -m pretrain.launch",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)
        if world_size is not None:
            check_run(cfg, world_size, cuda=torch.cuda.is_available())
    except ConfigError as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    try:  # the ranks take the lock; a job that would only find it held is not started at all
        in_use = holder(run_dir)
    except RunDirectoryError:  # not a usable directory: rank 0 says so when it tries to take the lock
        in_use = None
    if in_use:
        print(f"error: {in_use}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    parser.prog = "python -m pretrain.launch"
    parser.set_defaults(signals_to_handle=STOP_SIGNALS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    world_size = _world_size(args)
    if args.module and args.training_script in CHECKED_MODULES:
        status = _check_training_args(list(args.training_script_args), world_size)
        if status:
            return status
    if "OMP_NUM_THREADS" not in os.environ and (world_size or 2) > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
    if os.environ.get(VERBOSE_ENV, "0") in ("", "0"):
        for name in ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the workers die with this process (orphans.py)
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = (
            f"was killed by {signal.Signals(-failure.exitcode).name}"
            if failure.exitcode < 0
            else f"exited with status {failure.exitcode}"
        )
        print(
            f"error: {len(err.failures)} rank(s) failed; the first, rank {rank} (pid {failure.pid}), {how}: "
            "its message is above",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as err:
        name = signal.Signals(err.sigval).name
        print(
            f"[launch] {name}: the ranks were asked to checkpoint and stop; re-run the same command to resume",
            file=sys.stderr,
        )
        return 0 if err.sigval == signal.SIGUSR1 else 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
