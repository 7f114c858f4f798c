"""Launch planner: validate a config against a GPU allocation, print the rank layout, the groups,
node-crossing warnings and a per-GPU memory estimate (logic in megatron_ext.launch.planner).

    python -m pretrain.plan --config configs/qwen3_1p7b.yaml --nodes 8 --gpus-per-node 8 \
        --set parallel.tensor=2 --set parallel.pipeline=2 [--summary] [--emit-sbatch]

--summary leaves out the per-rank and per-group listings (over a thousand lines at a thousand
GPUs) and prints the sizes, one line per group kind, the peak memory and the warnings.

Runs on any machine (the model is built on the meta device). Inside a SLURM allocation --nodes
and --gpus-per-node default to the allocation's and must agree with it.
"""

import argparse
import os
import sys

from megatron_ext.config import ConfigError
from megatron_ext.launch.memory import meta_parameter_inventory
from megatron_ext.launch.planner import check_allocation, format_plan, format_plan_summary, make_plan, sbatch_command
from megatron_ext.run import load_config


def _env_int(name):
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument(
        "--nodes",
        type=int,
        default=_env_int("SLURM_JOB_NUM_NODES"),
        help="nodes of the allocation (default: SLURM_JOB_NUM_NODES)",
    )
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=_env_int("SLURM_GPUS_ON_NODE"),
        help="GPUs (ranks) per node (default: SLURM_GPUS_ON_NODE)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field; repeatable",
    )
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument(
        "--summary", action="store_true", help="print sizes, group kinds, memory and warnings, not every rank and group"
    )
    parser.add_argument("--emit-sbatch", action="store_true", help="print the sbatch command for this allocation")
    args = parser.parse_args(argv)
    if args.nodes is None or args.gpus_per_node is None:
        parser.error("--nodes and --gpus-per-node are required outside a SLURM allocation")
    try:
        cfg = load_config(args.config, args.overrides)
        check_allocation(cfg, args.nodes, args.gpus_per_node)
    except ConfigError as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    plan = make_plan(
        cfg, args.nodes, args.gpus_per_node, meta_parameter_inventory(cfg), gpu_memory_gib=args.gpu_memory_gib
    )
    print(format_plan_summary(plan) if args.summary else format_plan(plan))
    if args.emit_sbatch:
        print(
            "\nSubmit from the repository root:\n  "
            + sbatch_command(args.config, args.overrides, args.nodes, args.gpus_per_node, job_name=cfg.name)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
