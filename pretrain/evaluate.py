"""Validation loss of a run directory's latest checkpoint.

    torchrun --nproc_per_node N -m pretrain.evaluate --run-dir runs/NAME [--batches 8] [--set ...] \
        [--layers 0-3,6] [--experts 0-31] [--top-k 4]

Uses the run's own config.yaml (overrides may change the layout: weights reshard on load). With
--layers / --experts / --top-k the full model is evaluated under that sub-network (as elastic
training ran it: other layers skipped, routing over the kept experts with that top-k), which equals
evaluating the sub-model ``pretrain.extract`` writes for it.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.config import ConfigError
from megatron_ext.parallel import ParallelSizes
from megatron_ext.parallel.state import parallel_job
from megatron_ext.run import check_run, load_config
from megatron_ext.run.checks import launch_hint
from megatron_ext.training.evaluate import evaluate_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--layers", default=None, help="sub-network: kept layers, e.g. 0-3,6 (default: all)")
    parser.add_argument("--experts", default=None, help="sub-network: kept experts, e.g. 0-31 (default: all)")
    parser.add_argument("--top-k", type=int, default=None, help="sub-network: experts per token")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    sub = None
    try:
        cfg = load_config(args.run_dir / "config.yaml", args.overrides)
        # A layout that does not fit the ranks gets one line naming the launch command (with this
        # command's own arguments) or the overrides, instead of the full list of problems.
        command = "-m pretrain.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
        hint = launch_hint(cfg, world_size, command)
        if hint is not None:
            print(f"error: {args.run_dir}: {hint}", file=sys.stderr)
            return 2
        check_run(cfg, world_size, cuda=cuda)
        if args.layers is not None or args.experts is not None or args.top_k is not None:
            from megatron_ext.moe.elastic import SubNetwork
            from megatron_ext.training.extract import check_subnetwork
            from pretrain.extract import parse_indices

            layers = parse_indices(args.layers) if args.layers else tuple(range(cfg.model.num_layers))
            sub = SubNetwork(layers, parse_indices(args.experts) if args.experts else None, args.top_k)
            check_subnetwork(cfg, sub)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    p = cfg.parallel
    sizes = ParallelSizes(
        tp=p.tensor, pp=p.pipeline, cp=p.context, ep=p.expert, etp=p.expert_tensor, vpp=p.virtual_pipeline
    )
    with parallel_job(sizes, seed=cfg.train.seed):
        loss = evaluate_checkpoint(cfg, args.run_dir, args.batches, sub)
        if dist.get_rank() == 0:
            under = (
                ""
                if sub is None
                else f" (sub-network: layers {list(sub.layers)}, experts "
                f"{'all' if sub.experts is None else list(sub.experts)}, top-k {sub.top_k or cfg.moe.top_k})"
            )
            print(f"{args.run_dir}: validation loss {loss:.4f} over {args.batches} batches{under}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
