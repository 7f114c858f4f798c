"""The training entry point end to end through the project launcher (``pretrain.launch``): run
directory contract, exact resume after a stop signal sent to the launcher, bad configs refused before
any rank starts, a failing rank reported in one line; and plain torchrun still works."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

REPO = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = {
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_sec",
    "consumed_samples",
    "model_flops_per_token",
    "mfu",
    "tflops_per_rank",
}

CONFIG = merge(
    TINY,
    {
        "name": "tiny",
        "model": {"hidden_dropout": 0.1, "attention_dropout": 0.1},
        "parallel": {"tensor": 2, "expert": 2, "expert_tensor": 1, "sequence_parallel": True},
        "data": {"seq_length": 32},
        "train": {"steps": 12, "lr": 3.0e-3, "warmup_steps": 2, "eval_interval": 12, "eval_steps": 1},
        "checkpoint": {"save_interval": 10, "keep_last": 2},
        "logging": {"log_interval": 1, "tensorboard": True},
        "moe": {
            "enabled": True,
            "num_experts": 4,
            "top_k": 2,
            "expert_ffn_hidden_size": 32,
            "shared_expert_ffn_hidden_size": 32,
        },
    },
)


def launch(
    config: Path, run_dir: Path, *overrides: str, nproc: int = 2, launcher: str = "pretrain.launch", cwd: Path = REPO
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        launcher,
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "pretrain.train",
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
    ]
    for item in overrides:
        cmd += ["--set", item]
    return subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted two-rank run of ``CONFIG`` for 24 steps, set on the command line (the file says
    12): the run directory whose contents the contract test checks, and the losses every interrupted
    and resumed run must reproduce. Returns the run directory and the launcher's output."""
    tmp = tmp_path_factory.mktemp("straight")
    config, run_dir = write_config(tmp), tmp / "run"
    proc = launch(config, run_dir, "train.steps=24")
    out = finish(proc)
    assert proc.returncode == 0, out
    return run_dir, out


def test_two_rank_run_fills_the_run_directory(straight):
    run_dir, out = straight
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 24 and resolved["moe"]["num_experts"] == 4  # --set recorded
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 25))
    assert all(REQUIRED_KEYS <= r.keys() for r in records)
    assert records[-1]["consumed_samples"] == 24 * 4
    peaks = [r["mem/peak_gib"] for r in records]  # peak RSS of the largest rank: a running maximum
    assert 0.05 < peaks[0] and peaks == sorted(peaks), peaks
    assert "val/loss" in records[11] and "val/loss" in records[23]
    assert records[-1]["loss"] < records[0]["loss"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000024"
    # Saved at steps 10, 20 and the end; the newest two kept.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000020", "step_00000024"]
    assert "step     24/24" in out


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGUSR1"])
def test_resume_after_a_stop_signal_reproduces_the_uninterrupted_losses(stop, straight, tmp_path):
    config, interrupted = write_config(tmp_path), tmp_path / "interrupted"
    reference = read_metrics(straight[0] / "metrics.jsonl")

    proc = launch(config, interrupted, "train.steps=24")
    metrics = interrupted / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # stop it between the periodic checkpoints (10, 20)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 13:
            break
        time.sleep(0.05)
    os.kill(proc.pid, getattr(signal, stop))  # to the launcher only: it forwards the signal to both ranks
    out = finish(proc)
    assert "stop signal received: checkpointed at step" in out, out
    assert proc.returncode == (0 if stop == "SIGUSR1" else 128 + signal.SIGTERM), out
    assert "Traceback" not in out, out
    stopped_at = int((interrupted / "checkpoints" / "latest").read_text().split("_")[1])
    assert 13 <= stopped_at < 24, stopped_at
    if stop == "SIGTERM":  # the checkpoint a stop signal writes is the same for both: resumed once, below
        return

    proc = launch(config, interrupted, "train.steps=24")  # the same command again
    out = finish(proc)
    assert proc.returncode == 0, out
    assert f"resumed from {interrupted / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in out
    resumed = read_metrics(metrics)
    assert [r["step"] for r in resumed] == list(range(1, 25)), "no lost or repeated steps"
    for a, b in zip(resumed, reference):  # bitwise: dropout, data order, Adam state all restored
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"]) == (b["step"], b["loss"], b["grad_norm"], b["lr"])
        assert a.get("val/loss") == b.get("val/loss")
    print(f"[resume] stopped by {stop} at step {stopped_at}")
    for a, b in zip(resumed, reference):
        print(f"[resume] step {a['step']:2d}  interrupted+resumed {a['loss']:.9f}  uninterrupted {b['loss']:.9f}")


def test_plain_torchrun_still_trains_from_another_directory(tmp_path):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    proc = launch(
        config, run_dir, "train.steps=3", "train.eval_interval=0", launcher="torch.distributed.run", cwd=tmp_path
    )
    out = finish(proc)
    assert proc.returncode == 0, out
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_a_bad_config_is_one_error_block_before_any_rank_starts(tmp_path):
    config, run_dir = write_config(tmp_path), tmp_path / "run"
    proc = launch(config, run_dir, "train.lr=-1", "parallel.expert=3")
    out = finish(proc, timeout=120)
    assert proc.returncode == 2, out
    assert out.startswith("error: ") and "train.lr=-1.0 must be positive" in out, out
    assert "Traceback" not in out and "ChildFailedError" not in out, out
    assert not run_dir.exists()  # no rank ran
    proc = launch(config, run_dir, "parallel.expert=3")  # a layout problem: found by the world-size check
    out = finish(proc, timeout=120)
    assert proc.returncode == 2 and "parallel.expert" in out and "Traceback" not in out, out
    assert not run_dir.exists()


def test_a_failing_rank_is_reported_in_one_line(tmp_path):
    config = write_config(tmp_path)
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the run directory should be")
    proc = launch(config, blocker)
    out = finish(proc, timeout=120)
    assert proc.returncode != 0, out
    launcher_lines = [line for line in out.splitlines() if "rank(s) failed" in line]
    assert len(launcher_lines) == 1 and launcher_lines[0].startswith("error: "), out
    assert "ChildFailedError" not in out and "torch/distributed/elastic" not in out, out
