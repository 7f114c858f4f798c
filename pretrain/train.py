"""Training entry point.

    torchrun --nproc_per_node N -m pretrain.train --config configs/NAME.yaml \
        [--run-dir DIR] [--set section.key=value ...]

Without --run-dir the run directory is runs/<config name>. Re-running the same command with the
same run directory resumes from its latest checkpoint.
"""

import argparse
import sys
from pathlib import Path

from megatron_ext.config import ConfigError, load_config
from megatron_ext.training.loop import Trainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config field; repeatable")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    try:
        Trainer(cfg, run_dir).run()
    except ConfigError as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
