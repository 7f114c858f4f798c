"""Run an experiment spec (a comparison table's grid of runs) and tabulate it.

    python -m pretrain.experiment run configs/experiments/consa_tiny.yaml [--slurm] [--evaluate-only]
    python -m pretrain.experiment report configs/experiments/consa_tiny.yaml

run: every run not finished yet, one after the other through the project's launcher (the shared
start first), then its evaluations; resumable: run the same command again after an interruption.
--slurm: submit one job per run instead (the spec's slurm: section; the variants wait for the shared
start), then `run --evaluate-only` once the jobs are done. report: results.md, results.json and
plots/ in the experiment directory. The spec format: megatron_ext/experiments/spec.py.
"""

import argparse
import sys

from megatron_ext.config import ConfigError


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train and evaluate every run of the spec not finished yet")
    run.add_argument("spec", help="experiment spec (configs/experiments/*.yaml)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--slurm", action="store_true", help="submit one sbatch job per run instead")
    mode.add_argument("--evaluate-only", action="store_true", help="evaluate the trained runs; start no training")
    report = commands.add_parser("report", help="results.md, results.json and plots of the finished runs")
    report.add_argument("spec", help="experiment spec (configs/experiments/*.yaml)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_ext.experiments.spec import load_spec

    try:
        spec = load_spec(args.spec)
    except ConfigError as err:
        print(f"error: {args.spec}: {err}", file=sys.stderr)
        return 2
    if args.command == "report":
        from megatron_ext.experiments.report import write_report

        paths = write_report(spec)
        print(paths["markdown"].read_text(), end="")
        print(f"results: {paths['markdown']}, {paths['json']}; plots: {paths['plots']}")
        return 0
    from megatron_ext.experiments.runner import ExperimentError, run_experiment, submit_slurm

    try:
        if args.slurm:
            jobs = submit_slurm(spec)
            print(
                f"submitted {len(jobs)} job(s); when they are done: "
                f"python -m pretrain.experiment run {args.spec} --evaluate-only"
            )
            return 0
        return run_experiment(spec, evaluate_only=args.evaluate_only)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
