"""Attention behaviour of a trained run, per layer and KV head.

    python -m pretrain.analyze --run-dir runs/NAME [--sequences 16] [--window W] [--step S] [--output DIR]

Statistics of the last token's attention over the first --sequences validation sequences (entropy,
mass within the window W, mean attended distance), each head sorted into a behaviour class (uniform,
strongly local, weakly local, sparse-broad, dense-broad; thresholds in
megatron_ext/experiments/analysis.py), and, when the run has an allocation.json, its per-layer SWA
fraction. Writes DIR/attention.json, DIR/attention.png (and DIR/swa_profile.png); DIR defaults to
RUN_DIR/analysis. W defaults to the run's hybrid_attention.window. One process (CPU or one GPU).
"""

import argparse
import os
import sys
from pathlib import Path

from megatron_ext.config import ConfigError


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--sequences", type=int, default=16, help="validation sequences (default 16)")
    parser.add_argument("--window", type=int, default=None, help="W of the local mass (default: the run's)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--output", type=Path, default=None, help="output directory (default RUN_DIR/analysis)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    problems = []
    if not (args.run_dir / "config.yaml").is_file():
        problems.append(f"--run-dir {args.run_dir} has no config.yaml: give a run directory")
    for name in ("sequences", "window"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name}={value} must be >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        problems.append("the analysis runs in one process: run it with python, not torchrun")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    from megatron_ext.experiments.analysis import CLASSES, analyze_run
    from megatron_ext.parallel import ParallelSizes
    from megatron_ext.parallel.state import parallel_job
    from megatron_ext.run import load_config

    try:
        seed = load_config(args.run_dir / "config.yaml").train.seed
    except ConfigError as err:
        print(f"error: {args.run_dir / 'config.yaml'}: {err}", file=sys.stderr)
        return 2
    with parallel_job(ParallelSizes(), seed=seed):
        try:
            record = analyze_run(
                args.run_dir, sequences=args.sequences, window=args.window, step=args.step, output=args.output
            )
        except (ConfigError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    output = args.output or args.run_dir / "analysis"
    print(f"{args.run_dir} step {record['step']}: last-token attention, W={record['window']}, T={record['seq_length']}")
    for layer in record["layers"]:
        cells = ", ".join(
            f"H{j} {c} (H {h:.2f}, m {m:.2f}, d {d:.0f})"
            for j, (c, h, m, d) in enumerate(
                zip(layer["class"], layer["entropy"], layer["local_mass"], layer["mean_distance"])
            )
        )
        print(f"  layer {layer['layer']}: {cells}")
    print("  classes: " + ", ".join(f"{name} {record['counts'][name]}" for name in CLASSES))
    if "swa_profile" in record:
        print("  SWA fraction per layer: " + " ".join(f"{x:.2f}" for x in record["swa_profile"]))
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
