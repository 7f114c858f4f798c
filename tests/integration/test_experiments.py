"""``megatron-ext experiment run / report`` and ``analyze`` end to end on a tiny spec: two variants run
through the project launcher; the second is stopped part-way by a signal to the runner (its ranks
checkpoint), and running the spec again skips the finished variant and resumes the other from its
checkpoint; with other evaluations in the spec, both are evaluated again without training; the
report has both rows with finite losses; the analysis classifies every head of a trained run and
writes its figure."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron_ext.experiments.report import write_report
from megatron_ext.experiments.spec import load_spec
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

REPO = Path(__file__).resolve().parents[2]
BASE = merge(
    TINY,
    {
        "name": "tiny",
        "data": {"kind": "synthetic", "seq_length": 32},
        "train": {"steps": 5, "eval_interval": 5, "eval_steps": 1},
        "checkpoint": {"save_interval": 0},
        "logging": {"log_interval": 1, "tensorboard": False},
        "hybrid_attention": {"window": 4},
    },
)
LONG = 60  # steps of the variant that is interrupted: long enough for the signal to land mid-way


def write_spec(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    spec = {
        "name": "tiny_table",
        "base": str(tmp_path / "base.yaml"),
        "output": str(tmp_path / "out"),
        "method": "consa",
        "seeds": [7],
        "variants": [
            {"name": "dense", "overrides": {"hybrid_attention.enabled": False}},
            {
                "name": "rule_head",
                "overrides": {
                    "hybrid_attention.enabled": True,
                    "hybrid_attention.method": "rule_head",
                    "train.steps": LONG,
                    "train.eval_interval": LONG,
                },
            },
        ],
        "evaluations": {"validation_batches": 1},
        "columns": ["tokens", "train_flops", "val_loss", "consa/swa_fraction", "consa/allocation"],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def experiment(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "pretrain.cli", "experiment", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    return out


def test_run_interrupt_resume_report_and_analyze(tmp_path):
    spec = write_spec(tmp_path)
    dense, rule = tmp_path / "out" / "dense" / "seed7", tmp_path / "out" / "rule_head" / "seed7"

    proc = experiment("run", str(spec))
    metrics = rule / "metrics.jsonl"
    deadline = time.monotonic() + 900  # generous: only a broken run takes this long, even on a busy machine
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the second run never logged 2 steps"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)  # to the runner: it passes the signal to the run in progress
    out = finish(proc)
    assert proc.returncode == 0, out
    assert "rule_head/seed7: stopped by SIGUSR1; run the same command to resume" in out, out
    assert (dense / "experiment.json").is_file() and not (rule / "experiment.json").exists()
    stopped_at = int((rule / "checkpoints" / "latest").read_text().split("_")[1])
    assert 2 <= stopped_at < LONG, stopped_at

    proc = experiment("run", str(spec))
    out = finish(proc)
    assert proc.returncode == 0, out
    assert "1/2 dense/seed7: finished, skipped" in out, out
    assert "2/2 rule_head/seed7: resuming" in out, out
    assert f"at step {stopped_at}" in out, out
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, LONG + 1)), "no lost or repeated steps"

    raw = yaml.safe_load(spec.read_text())  # more validation batches: both runs evaluated again, not trained
    raw["evaluations"]["validation_batches"] = 2
    spec.write_text(yaml.safe_dump(raw))
    out = finish(experiment("run", str(spec)))
    assert out.count("trained; the spec's evaluations changed since it was evaluated") == 2, out
    assert "training in" not in out and "resuming" not in out, out
    assert json.loads((dense / "experiment.json").read_text())["evaluations"]["validation_batches"] == 2
    assert "1/2 dense/seed7: finished, skipped" in finish(experiment("run", str(spec)))

    write_report(load_spec(spec))  # what `experiment report` writes (pure Python: in this process)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    assert sorted(rows) == ["dense", "rule_head"] and results["missing"] == []
    assert rows["dense"]["tokens"] == 5 * 4 * 32 and rows["rule_head"]["tokens"] == LONG * 4 * 32
    for row in rows.values():
        assert math.isfinite(row["val_loss"]) and math.isfinite(row["train_loss"]) and row["train_flops"] > 0
    assert rows["dense"]["consa/swa_fraction"] == 0.0 and rows["rule_head"]["consa/swa_fraction"] == 0.5
    assert rows["rule_head"]["consa/allocation"] == "SF SF"
    assert (tmp_path / "out" / "plots" / "loss.png").is_file()
    assert "| rule_head | 7 |" in (tmp_path / "out" / "results.md").read_text()
    (paired,) = results["paired"]  # against the first variant at the same seed
    assert paired["variant"] == "rule_head" and paired["baseline"] == "dense"
    assert paired["per_seed"] == {"7": rows["rule_head"]["val_loss"] - rows["dense"]["val_loss"]}

    env = dict(os.environ, PYTHONPATH=str(REPO))
    analyze = [sys.executable, "-m", "pretrain.cli", "analyze", "--run-dir", str(dense), "--sequences", "4"]
    result = subprocess.run(analyze, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((dense / "analysis" / "attention.json").read_text())
    assert record["window"] == 4 and record["seq_length"] == 32 and len(record["layers"]) == 2
    assert all(len(layer["class"]) == 2 for layer in record["layers"])
    assert sum(record["counts"].values()) == 4
    assert (dense / "analysis" / "attention.png").is_file()
