"""Extract a standalone sub-model (layers; with MoE also experts and top-k) from a checkpoint.

    python -m pretrain.extract --run-dir runs/NAME [--step N] --layers 0,1,2,5 \\
        --experts 0-31 --top-k 4 --output runs/NAME-sub

Writes OUTPUT/config.yaml and OUTPUT/checkpoints/ (a checkpoint at step 0 holding the weights),
so ``python -m pretrain.train --config OUTPUT/config.yaml --run-dir OUTPUT`` continues training it
and evaluation tools load it like any run. Runs in one process on CPU (no GPU needed).
"""

import argparse
import sys
from pathlib import Path

from megatron_ext.config import ConfigError
from megatron_ext.moe.elastic import SubNetwork
from megatron_ext.parallel import ParallelSizes
from megatron_ext.parallel.state import parallel_job
from megatron_ext.run import load_config
from megatron_ext.training.extract import check_subnetwork, extract_submodel, parse_indices


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.extract", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--layers", required=True, help="kept layers, e.g. 0-3,6")
    parser.add_argument("--experts", default=None, help="kept experts, e.g. 0-31 (default: all)")
    parser.add_argument("--top-k", type=int, default=None, help="experts per token (default: the model's)")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    try:  # the sub-network is checked against the run's config before anything is loaded or written
        experts = parse_indices(args.experts, "--experts") if args.experts is not None else None
        sub = SubNetwork(parse_indices(args.layers, "--layers"), experts, args.top_k)
        check_subnetwork(load_config(args.run_dir / "config.yaml"), sub)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with parallel_job(ParallelSizes()):
        try:
            print(f"wrote {extract_submodel(args.run_dir, args.output, sub, args.step)}")
        except (ConfigError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
