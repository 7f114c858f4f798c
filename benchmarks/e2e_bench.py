"""End to end: the smoke configuration's training throughput and peak memory on this machine.

Runs ``configs/smoke.yaml`` (2 ranks, TP=2 / EP=2 / SP, the built-in corpus, every capability on:
ConSA mask learning then the static hybrid, elastic MoE with expert bias, SGT growth) with
``torchrun`` in a temporary run directory, and beside it the same model with the three methods
switched off (a plain MoE at its default top-k without expert bias, full attention, no loops),
alternating. Reported from
each run's ``metrics.jsonl``: the median of the logged ``tokens_per_sec`` and the largest
``mem/peak_gib`` (peak resident memory of the largest rank; on GPU the allocator's peak), plus
the wall time of the whole command (start-up and checkpoints included).

    python -m benchmarks.e2e_bench [--reps 1]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from benchmarks.common import command_line, row

REPO = Path(__file__).resolve().parents[1]
METHODS_OFF = [
    "elastic.enabled=false",
    "routing.expert_bias=false",
    "hybrid_attention.enabled=false",
    "looping.enabled=false",
]


def train(run_dir: Path, overrides: List[str], nproc: int = 2) -> Dict[str, float]:
    """One ``torchrun`` of the smoke configuration; its throughput, memory and wall time."""
    from megatron_ext.training.rundir import read_metrics

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "pretrain.train",
        "--config",
        "configs/smoke.yaml",
        "--run-dir",
        str(run_dir),
    ]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stdout[-4000:]}")
    records = read_metrics(run_dir / "metrics.jsonl")
    return {
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in records),
        "peak_gib": max(r["mem/peak_gib"] for r in records),
        "wall_s": wall,
    }


def run(reps: int = 1) -> list:
    results: Dict[str, List[Dict[str, float]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
        for rep in range(max(1, reps)):
            for name in ("on", "off") if rep % 2 == 0 else ("off", "on"):
                overrides = [] if name == "on" else METHODS_OFF
                results[name].append(train(Path(tmp) / f"{name}-{rep}", overrides))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    return [
        row(
            "end to end",
            "smoke, every capability on: tokens/s (median of logged steps)",
            med("on", "tokens_per_sec"),
            "report",
        ),
        row(
            "end to end",
            "smoke, every capability on: peak memory of the largest rank (GiB)",
            med("on", "peak_gib"),
            "report",
        ),
        row("end to end", "smoke, every capability on: wall time of the run (s)", med("on", "wall_s"), "report"),
        row(
            "end to end",
            "smoke tokens/s, methods on / off",
            med("on", "tokens_per_sec") / med("off", "tokens_per_sec"),
            "report",
        ),
        row(
            "end to end",
            "smoke peak memory, methods on / off",
            med("on", "peak_gib") / med("off", "peak_gib"),
            "report",
        ),
    ]


if __name__ == "__main__":
    command_line(run, __doc__, default_reps=1)
