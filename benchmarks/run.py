"""Run the benchmarks and write benchmarks/results/<date>.json and a Markdown table.

    python -m benchmarks.run [--reps 5] [--only attention sgt]

Every figure is a ratio of two measurements taken side by side in the same process (medians of
several repetitions, public timers only), so machine speed cancels out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

import torch

BENCHMARKS = {
    "attention": "benchmarks.swa_kernel_bench",
    "sgt": "benchmarks.sgt_bench",
}


def markdown(rows) -> str:
    lines = ["| benchmark | metric | value | target | ideal |", "|---|---|---|---|---|"]
    for r in rows:
        ideal = f"{r['ideal']:.3f}" if "ideal" in r else ""
        lines.append(f"| {r['benchmark']} | {r['metric']} | {r['value']:.4f} | {r['target']} | {ideal} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import importlib

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS))
    args = parser.parse_args()
    rows = []
    for name in args.only:
        rows += importlib.import_module(BENCHMARKS[name]).run(reps=args.reps)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    record = {"date": stamp, "machine": platform.machine(), "cpus": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    (out / f"{stamp}.json").write_text(json.dumps(record, indent=1))
    table = markdown(rows)
    (out / f"{stamp}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
