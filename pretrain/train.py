"""Training entry point.

    python -m pretrain.launch --nproc-per-node N -m pretrain.train --config configs/NAME.yaml \
        [--run-dir DIR] [--set section.key=value ...]

(``torchrun`` in place of ``python -m pretrain.launch`` works too; the launcher checks the config
before the ranks start and reports a failure without a traceback.)

Without --run-dir the run directory is runs/<config name>. Re-running the same command with the
same run directory resumes from its latest checkpoint. Ranks started by srun or mpirun instead of
torchrun: --launcher slurm / mpi (auto-detected; see megatron_ext/launch/bootstrap.py).
"""

import argparse
import os
import sys
from pathlib import Path

from megatron_ext.compat.safe_load import UntrustedFileError
from megatron_ext.config import ConfigError
from megatron_ext.data.indexed import DataError
from megatron_ext.evaluation.during_training import training_callbacks
from megatron_ext.launch.bootstrap import LAUNCHERS, LaunchError, prepare_launch
from megatron_ext.launch.orphans import rank_dies_with_agent
from megatron_ext.run import load_config
from megatron_ext.training.checkpoint import CheckpointError
from megatron_ext.training.loop import NonFiniteLossError, Trainer
from megatron_ext.training.preflight import check_inputs
from megatron_ext.training.runlock import RunDirectoryError


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field; repeatable",
    )
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="auto",
        help="what started the ranks: torchrun, srun tasks (slurm) or MPI (mpi); default: detect",
    )
    parser.add_argument(
        "--rendezvous-timeout",
        type=_positive_seconds,
        default=600.0,
        metavar="SECONDS",
        help="slurm / mpi launchers: how long ranks wait for rank 0's rendezvous (default 600)",
    )
    return parser.parse_args(argv)


def _report(message: str) -> None:
    """Every rank finds the same problem: one of them (the first, or a process without a rank) says it."""
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if name in os.environ:
            if os.environ[name] != "0":
                return
            break
    print(message, file=sys.stderr)


def main(argv=None) -> int:
    rank_dies_with_agent()  # a rank of a launcher that died must not train on unsupervised
    args = parse_args(argv)
    try:
        # Field and layout problems in one message (the world size as the launcher set it).
        cfg = load_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        check_inputs(cfg)
        callbacks = training_callbacks(cfg)  # train.eval_tasks: its tasks and options checked here
    except ConfigError as err:
        _report(f"error: {args.config}: {err}")
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    try:
        launch = prepare_launch(cfg, args.launcher, args.rendezvous_timeout)  # runs check_run: the trainer need not
        Trainer(cfg, run_dir, callbacks).run(checked=True)
        del launch  # held until here: rank 0 serves the job's store from it
    except ConfigError as err:
        _report(f"error: {args.config}: {err}")
        return 2
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (CheckpointError, UntrustedFileError, DataError, RunDirectoryError) as err:
        _report(f"error: {err}")
        return 2
    except NonFiniteLossError as err:  # every rank has the same losses: one of them says it
        _report(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
