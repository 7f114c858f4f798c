"""Validation loss of a run directory's latest checkpoint.

    torchrun --nproc_per_node N -m pretrain.evaluate --run-dir runs/NAME [--batches 8] [--set ...]

Uses the run's own config.yaml (overrides may change the layout: weights reshard on load).
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.config import ConfigError
from megatron_ext.run import check_run, load_config
from megatron_ext.parallel import ParallelSizes
from megatron_ext.parallel.state import parallel_job
from megatron_ext.training.evaluate import evaluate_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    try:
        cfg = load_config(args.run_dir / "config.yaml", args.overrides)
        check_run(cfg, int(os.environ.get("WORLD_SIZE", "1")), cuda=cuda)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    p = cfg.parallel
    sizes = ParallelSizes(tp=p.tensor, pp=p.pipeline, cp=p.context, ep=p.expert, etp=p.expert_tensor,
                          vpp=p.virtual_pipeline)
    with parallel_job(sizes, seed=cfg.train.seed):
        loss = evaluate_checkpoint(cfg, args.run_dir, args.batches)
        if dist.get_rank() == 0:
            print(f"{args.run_dir}: validation loss {loss:.4f} over {args.batches} batches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
