"""Run the benchmarks and write benchmarks/results/<date>.json and a Markdown table.

    python -m benchmarks.run [--reps 5] [--only NAME ...]   (names: the keys of BENCHMARKS below)

Every target is on a ratio of two measurements taken side by side in the same process or run
(cases interleaved, medians over repetitions, public timers only), so machine speed cancels out;
absolute figures (step times, tokens/s, memory) are reported beside them for context.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.common import meets

BENCHMARKS = {  # name -> module with run(reps) -> rows; run in this order
    "attention": "benchmarks.swa_kernel_bench",
    "sgt": "benchmarks.sgt_bench",
    "moe": "benchmarks.moe_bench",
    "overhead": "benchmarks.overhead_bench",
    "inference": "benchmarks.inference_bench",
    "decode_hf": "benchmarks.decode_hf_bench",
    "e2e": "benchmarks.e2e_bench",
    "cp_comm": "benchmarks.cp_comm_bench",
    "preprocess": "benchmarks.preprocess_bench",  # needs MEGATRON_LM=DIR (a Megatron-LM checkout); else skipped
    "checkpoint": "benchmarks.checkpoint_bench",
}
E2E_REPS = 1  # two whole training runs a repetition (~40 s each on 2 CPU cores)


def markdown(rows) -> str:
    lines = ["| benchmark | metric | value | target | met | ideal |", "|---|---|---|---|---|---|"]
    for r in rows:
        ideal = f"{r['ideal']:.3f}" if "ideal" in r else ""
        met = {True: "yes", False: "**no**", None: ""}[meets(r["value"], r["target"])]
        lines.append(f"| {r['benchmark']} | {r['metric']} | {r['value']:.4f} | {r['target']} | {met} | {ideal} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import importlib

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    args = parser.parse_args()
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: use at least 1")
    rows = []
    for name in BENCHMARKS:
        if name in args.only:
            start = time.perf_counter()
            module = importlib.import_module(BENCHMARKS[name])
            rows += module.run(reps=E2E_REPS if name == "e2e" else args.reps)
            print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    minute = stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    runs = 1
    while (out / f"{stamp}.json").exists():  # a later run in the same minute keeps the earlier one's files
        runs += 1
        stamp = f"{minute}-{runs}"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record = {
        "date": stamp,
        "machine": platform.machine(),
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "reps": args.reps,
        "rows": rows,
    }
    (out / f"{stamp}.json").write_text(json.dumps(record, indent=1))
    table = markdown(rows)
    (out / f"{stamp}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
