"""Parameter-count report of a config (built on the meta device: paper-scale configs fit anywhere).

python -m pretrain.params --config configs/qwen3_1p7b.yaml [--set section.key=value ...]
"""

import argparse
import json
import sys

from megatron_ext.config import ConfigError
from megatron_ext.parallel import ParallelSizes
from megatron_ext.parallel.state import parallel_job
from megatron_ext.run import load_config
from megatron_ext.run.param_count import count_parameters


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.params", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    with parallel_job(ParallelSizes()):  # one local rank: the count is of the unsharded model
        report = count_parameters(cfg)
    print(json.dumps(report.as_dict()) if args.json else f"{cfg.name}: {report.format()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
