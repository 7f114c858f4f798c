"""The benchmark harness: paired ratios, targets, interleaving, and the GPU check's code paths
(run at toy sizes on the CPU, so that the script a GPU session runs once does not rot)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import interleaved, meets, ratio

REPO = Path(__file__).resolve().parents[2]


def test_ratio_is_the_median_of_per_repetition_ratios():
    times = {"a": [2.0, 4.0, 6.0], "b": [1.0, 1.0, 3.0]}  # per repetition 2, 4, 2
    assert ratio(times, "a", "b") == 2.0
    assert ratio(times, "b", "a") == 0.5


def test_targets_are_read_from_their_text():
    assert meets(0.3, "<= 0.35") is True
    assert meets(0.36, "<= 0.35") is False
    assert meets(2.0, ">= 1.5") is True
    assert meets(1.0, "report") is None and meets(1.0, "~0.19") is None and meets(1.0, "") is None


def test_cases_alternate_order_between_repetitions():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {name: len(ts) for name, ts in times.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="reps"):
        interleaved({"a": lambda: None}, reps=0)


def test_gpu_check_runs_at_toy_sizes_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--reps", "1", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = tmp_path.glob("gpu-*.json")
    record = json.loads(result.read_text())
    assert record["failed"] == [] and record["tiny"] is True
    metrics = [r["metric"] for r in record["rows"]]
    for expected in (
        "hybrid model tokens/s",
        "SWA / FA fwd+bwd, T=512",
        "gated (stage 1) / FA layer",
        "MoE tokens/s",
        "step time top-k 25% / full",
    ):
        assert any(m.startswith(expected) for m in metrics), (expected, metrics)
    assert all(r["value"] > 0 for r in record["rows"])
