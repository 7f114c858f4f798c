"""Golden-value cases: short runs of the real trainer whose per-step figures are committed.

Each case is a run config (the smoke config with its schedule scaled down so that every method
event happens within the run, and tiny models at TP=2, PP=2 and EP=2 with every capability on).
``python -m tests.golden.regenerate`` rewrites ``golden_values.json``; ``test_golden.py`` runs the
cases again and asks for the same numbers, bit for bit. Non-compute changes (refactors) must keep
them; a compute change regenerates the file and says why the numbers moved.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tests.configs import EVERY_CAPABILITY, merge

GOLDEN_FILE = Path(__file__).with_name("golden_values.json")
SMOKE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"

VOLATILE_KEYS = ("tokens_per_sec", "mem/peak_gib", "tflops_per_rank", "mfu")
"""Metrics that measure the machine, not the computation: not compared."""

# Every capability on: ConSA mask learning then the static hybrid, elastic MoE with expert bias,
# SGT growth (select, fade, freeze).
_SCHEDULE = {
    "hybrid_attention": {"mask_learning_steps": 8, "target_warmup_steps": 3},
    "looping": {"first_selection_step": 4, "window": 3, "max_selected_layers": 2},
    "logging": {"log_interval": 1, "tensorboard": False},
    "checkpoint": {"save_interval": 0, "save_at_end": False},
}

_TINY = merge(EVERY_CAPABILITY, {"name": "golden"})


def case_configs() -> Dict[str, dict]:
    """``{case: (config dict)}``; every case runs on two gloo ranks."""
    import yaml

    smoke = yaml.safe_load(SMOKE_CONFIG.read_text())
    return {
        # train.min_lr: the smoke config's value when these were recorded (its own schedule is longer now)
        "smoke": merge(
            smoke,
            _SCHEDULE,
            {
                "train": {"steps": 16, "eval_interval": 8, "min_lr": 3.0e-4},
                "hybrid_attention": {"mask_learning_start_step": 0, "mask_learning_steps": 10},
            },
        ),
        "tp2": merge(_TINY, _SCHEDULE, {"parallel": {"tensor": 2, "sequence_parallel": True}}),
        "pp2": merge(_TINY, _SCHEDULE, {"parallel": {"pipeline": 2}}),
        "ep2": merge(_TINY, _SCHEDULE, {"parallel": {"expert": 2}}),
    }


def run_case(config: dict, run_dir: str) -> List[dict]:
    """Train ``config`` in ``run_dir`` (on the ranks of the calling job); the logged records
    without the volatile keys."""
    from megatron_ext.config import from_dict
    from megatron_ext.run import RunConfig
    from megatron_ext.training.loop import Trainer
    from megatron_ext.training.rundir import read_metrics

    Trainer(from_dict(RunConfig, copy.deepcopy(config)), Path(run_dir), log=lambda line: None).run()
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in VOLATILE_KEYS} for r in records]


def _cpu_model() -> Tuple[str, str]:
    """(model name, a digest of the instruction-set flags): BLAS libraries dispatch on both."""
    import hashlib

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), ""
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    digest = hashlib.sha256(" ".join(sorted(flags.group(1).split())).encode()).hexdigest()[:12] if flags else ""
    return (model.group(1).strip() if model else platform.machine()), digest


_BLAS_ENV = ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE", "OPENBLAS_CORETYPE")
"""Variables that pick another BLAS code path on the same CPU."""


def environment() -> Dict[str, object]:
    """What decides the last bits of the golden runs, taken on a rank of the calling job: library
    versions, the CPU and the SIMD level torch dispatches to, the BLAS, the ranks' thread count, and
    which sliding-window kernel runs (the fused C++ kernel needs a compiler; the blocked one is the
    fallback)."""
    import megatron.core
    import torch

    from megatron_ext.models import fused_swa

    cpu, flags = _cpu_model()
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": (blas.group(1) if blas else "unknown") + (f" {mkl.group(1)}" if mkl else ""),
        "threads_per_rank": torch.get_num_threads(),
        "swa_kernel": "fused" if fused_swa.available() else "blocked",
        "blas_env": {name: os.environ[name] for name in _BLAS_ENV if name in os.environ},
    }


# Outside the recording environment, float figures are compared to a tolerance: |got - golden| <=
# atol + rtol * |golden|, the first matching key prefix deciding. Calibrated on the recording machine
# by changing what differs between machines (torch's SIMD level AVX512 -> AVX2, MKL's code path
# AVX512 -> AVX2, the fused -> the blocked SWA kernel, and all at once); the largest relative moves
# seen over the four cases: loss 2.5e-6, loss/image 1.2e-5, val/loss 1.4e-6, SGT entropies 5e-7,
# ConSA, MoE and elastic figures 0, and the gradient norm 2e-2 (the smoke case's late steps, after
# binarization, where gradient spikes amplify the last bits; its loss there moves 1e-6). A real change
# of computation moves the loss trajectory by orders of magnitude more: test_golden.py shows a 1%
# learning-rate change, a swapped gate argument and one extra loop pass each failing it. Integers,
# strings and the structure (keys, list lengths) are always exact; lists printed with 6 decimals get
# an atol of two units in their last place.
TOLERANCES: Tuple[Tuple[str, float, float], ...] = (
    # (key prefix, rtol, atol)
    ("grad_norm", 1e-1, 0.0),
    ("consa/", 1e-4, 2e-6),
    ("sgt/", 1e-4, 2e-6),
    ("", 1e-4, 1e-7),
)


def tolerance(key: str) -> Tuple[float, float]:
    return next((rtol, atol) for prefix, rtol, atol in TOLERANCES if key.startswith(prefix))


def _close(got, want, rtol: float, atol: float) -> bool:
    if isinstance(want, list):
        return (
            isinstance(got, list) and len(got) == len(want) and all(_close(g, w, rtol, atol) for g, w in zip(got, want))
        )
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return math.isclose(got, want, rel_tol=rtol, abs_tol=atol) or (math.isnan(got) and math.isnan(want))
    return type(got) is type(want) and got == want


def first_difference(got: List[dict], want: List[dict], exact: bool) -> Optional[str]:
    """None when ``got`` reproduces ``want`` (bit for bit when ``exact``, else within
    :data:`TOLERANCES`), else where they first differ."""
    if len(got) != len(want):
        return f"{len(got)} records, golden {len(want)}"
    for step, (a, b) in enumerate(zip(got, want), start=1):
        for key in sorted(set(a) | set(b)):
            rtol, atol = (0.0, 0.0) if exact else tolerance(key)
            if key not in a or key not in b or not _close(a[key], b[key], rtol, atol):
                return f"step {step}, {key!r}: got {a.get(key)!r}, golden {b.get(key)!r} (rtol {rtol:g}, atol {atol:g})"
    return None


def environment_difference(here: Dict[str, object], recorded: Dict[str, object]) -> Dict[str, Tuple]:
    """``{field: (here, recorded)}`` for each field that differs."""
    return {
        key: (here.get(key), recorded.get(key))
        for key in sorted(set(here) | set(recorded))
        if here.get(key) != recorded.get(key)
    }


def load_golden() -> dict:
    """``{"environment": {...}, "cases": {case: [record, ...]}}``."""
    return json.loads(GOLDEN_FILE.read_text())
