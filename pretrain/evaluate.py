"""Evaluate a run directory's checkpoint: validation loss, or tasks.

    torchrun --nproc_per_node N -m pretrain.evaluate --run-dir runs/NAME [--batches 8] [--set ...] \\
        [--layers 0-3,6] [--experts 0-31] [--top-k 4]
    python -m pretrain.evaluate --run-dir runs/NAME --tasks mx_python_syntax,passkey [--num-fewshot K] \\
        [--limit N] [--include-path DIR] [--option lengths=256,512] [--step S] [--layers ...]

Without --tasks: the mean validation loss over --batches global batches, on the job's layout (the
run's own config.yaml; overrides may change the layout: weights reshard on load).

With --tasks (one process: the CPU or one GPU): lm-eval tasks (EleutherAI's harness,
``pip install '.[eval]'``: its registry, this project's local tasks ``mx_*``, and task YAML files in
--include-path directories) and this project's own long-context tasks (``passkey``, ``needle``,
``extrapolation``; --option key=value settings), on the model exactly as training left it (hybrid
allocation or gates, SGT loops). Results are printed as a table and written to
``RUN_DIR/eval/<step>/<task>.json``.

With --layers / --experts / --top-k the full model is evaluated under that sub-network (as elastic
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
from megatron_ext.run import check_run
from megatron_ext.run.checks import launch_hint
from megatron_ext.run.schedule import trained_config
from megatron_ext.training.evaluate import evaluate_checkpoint


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--batches", type=int, default=8, help="validation batches (without --tasks)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--layers", default=None, help="sub-network: kept layers, e.g. 0-3,6 (default: all)")
    parser.add_argument("--experts", default=None, help="sub-network: kept experts, e.g. 0-31 (default: all)")
    parser.add_argument("--top-k", type=int, default=None, help="sub-network: experts per token")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (lm-eval, mx_*, passkey, ...)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--include-path", action="append", default=[], help="a directory of lm-eval task YAMLs")
    parser.add_argument("--option", action="append", default=[], help="key=value for the project's own tasks")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests scored together (--tasks)")
    return parser.parse_args(argv)


def _problems(args) -> list:
    problems = []
    if not (args.run_dir / "config.yaml").is_file():
        problems.append(f"--run-dir {args.run_dir} has no config.yaml: give a run directory")
    for name in ("batches", "limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')}={value} must be >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        problems.append(f"--num-fewshot={args.num_fewshot} must be >= 0")
    for option in args.option:
        if "=" not in option:
            problems.append(f"--option {option!r} is not key=value")
    for path in args.include_path:
        if not Path(path).is_dir():
            problems.append(f"--include-path {path} is not a directory")
    if args.tasks is not None and not [t for t in args.tasks.split(",") if t.strip()]:
        problems.append("--tasks is empty: name one or more tasks")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    problems = _problems(args)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.tasks is not None:
        return run_tasks(args)
    return run_validation(args, argv)


def _subnetwork(cfg, args):
    from megatron_ext.training.extract import subnetwork_of

    return subnetwork_of(cfg, args.layers, args.experts, args.top_k)


def run_tasks(args) -> int:
    from megatron_ext.evaluation.model import EvalModel
    from megatron_ext.evaluation.tasks_runner import (
        check_options,
        check_task_names,
        evaluate_tasks,
        format_table,
        write_results,
    )
    from megatron_ext.run.builder import unsharded

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        print("error: --tasks evaluates in one process: run it with python, not torchrun", file=sys.stderr)
        return 2
    try:
        cfg = unsharded(trained_config(args.run_dir, args.step, args.overrides))
        sub = _subnetwork(cfg, args)
        check_task_names(names, args.include_path)  # before the model loads
        options = dict(option.split("=", 1) for option in args.option)
        check_options(names, options)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with parallel_job(ParallelSizes(), seed=cfg.train.seed):
        try:
            model = EvalModel.load(args.run_dir, args.step, sub, args.overrides)
            results = evaluate_tasks(
                model,
                names,
                num_fewshot=args.num_fewshot,
                limit=args.limit,
                include_paths=args.include_path,
                options=options,
                batch_size=args.batch_size,
            )
        except (ConfigError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    settings = {"subnetwork": None if sub is None else {"layers": list(sub.layers), "top_k": sub.top_k}}
    if sub is not None and sub.experts is not None:
        settings["subnetwork"]["experts"] = list(sub.experts)
    paths = write_results(args.run_dir, model.step, results, limit=args.limit, **settings)
    print(f"{args.run_dir} step {model.step}:")
    print(format_table(results))
    print(f"results: {paths[0].parent}")
    return 0


def run_validation(args, argv) -> int:
    cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = trained_config(args.run_dir, args.step, args.overrides)
        # A layout that does not fit the ranks gets one line naming the launch command (with this
        # command's own arguments) or the overrides, instead of the full list of problems.
        command = "-m pretrain.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
        hint = launch_hint(cfg, world_size, command)
        if hint is not None:
            print(f"error: {args.run_dir}: {hint}", file=sys.stderr)
            return 2
        check_run(cfg, world_size, cuda=cuda)
        sub = _subnetwork(cfg, args)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    p = cfg.parallel
    sizes = ParallelSizes(
        tp=p.tensor, pp=p.pipeline, cp=p.context, ep=p.expert, etp=p.expert_tensor, vpp=p.virtual_pipeline
    )
    with parallel_job(sizes, seed=cfg.train.seed):
        loss = evaluate_checkpoint(cfg, args.run_dir, args.batches, sub, args.step)
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
