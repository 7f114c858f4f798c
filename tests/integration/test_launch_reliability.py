"""The job's life through the project launcher: one job per run directory (a second one exits 2
before any rank starts), ranks that die with a SIGKILLed launcher and a lock they left taken over,
Ctrl-C (SIGINT) handled like SIGTERM (checkpoint, then exit) with a second one ending the rank at
once, checkpoint writers that die with their rank, and a launcher that is not the one that started
the ranks refused with a message naming the right one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge
from tests.integration.test_train_entry import finish, launch

REPO = Path(__file__).resolve().parents[2]
LONG = merge(
    TINY,
    {
        "name": "long",
        "data": {"kind": "synthetic"},
        "train": {"steps": 100000, "warmup_steps": 1, "eval_interval": 0},
        "checkpoint": {"save_interval": 0, "keep_last": 1},
        "logging": {"log_interval": 1},
    },
)
"""A run that never ends by itself and never checkpoints on its own."""


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(LONG))
    return path


def _wait_for_records(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    raise AssertionError(f"{metrics} did not reach {count} records")


def _children(pid: int) -> list:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_gone(pids, timeout: float = 60) -> list:
    """The pids still alive after ``timeout`` seconds (killed then, so that no test leaks them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if not _gone(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    return alive


def test_one_job_per_run_directory_and_no_rank_outlives_its_launcher(tmp_path):
    config, run_dir = _config(tmp_path), tmp_path / "run"
    first = launch(config, run_dir, nproc=1)
    ranks = []
    try:
        _wait_for_records(run_dir, 2, first)
        ranks = _children(first.pid)  # torchrun starts each rank in a session of its own
        holder = json.loads((run_dir / ".lock").read_text())

        second = launch(config, run_dir, "train.steps=3", nproc=1)
        out = finish(second, timeout=120)
        assert second.returncode == 2, out
        assert out.startswith("error: ") and "in use by another job" in out, out
        assert f"pid {holder['pid']}" in out and holder["host"] in out and holder["started"] in out, out
        assert "Traceback" not in out and "step " not in out, out  # no rank of the second job started
        steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
        assert steps == list(range(1, len(steps) + 1)), "only the first job writes the metrics"

        assert holder["pid"] in ranks
        os.kill(first.pid, signal.SIGKILL)  # the launcher dies; its rank must not train on
        first.wait()
        assert _wait_gone(ranks) == [], "a rank outlived its launcher"
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
        _wait_gone(ranks, timeout=0)

    third = launch(config, run_dir, "train.steps=2", nproc=1)
    out = finish(third)
    assert third.returncode == 0, out
    assert "taking over the lock" in out and f"pid {holder['pid']}" in out, out
    assert (run_dir / ".lock").read_text() == ""


def test_ctrl_c_checkpoints_and_exits(tmp_path):
    config, run_dir = _config(tmp_path), tmp_path / "run"
    proc = launch(config, run_dir, nproc=1)
    ranks = []
    try:
        _wait_for_records(run_dir, 2, proc)
        ranks = _children(proc.pid)
        os.kill(proc.pid, signal.SIGINT)  # to the launcher only: it passes it on to the ranks
        out = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        _wait_gone(ranks, timeout=0)
    assert "stop signal received: checkpointed at step" in out, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert proc.returncode == 128 + signal.SIGINT, out
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert stopped_at >= 2 and read_metrics(run_dir / "metrics.jsonl")[-1]["step"] == stopped_at


STOPPABLE = """
import sys, time
from megatron_ext.training.signals import StopRequest
stop = StopRequest()
stop.install()
print("ready", flush=True)
while stop.received is None:
    time.sleep(0.01)
print("stop requested: finishing the step", flush=True)
while True:  # a step that takes long: the second Ctrl-C must not wait for it
    time.sleep(0.01)
"""


def test_a_second_ctrl_c_exits_at_once():
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "stop requested: finishing the step"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "second interrupt: exiting now" in err and "Traceback" not in err, err


STUCK_SAVE = """
import os, sys, time
from pathlib import Path
from megatron_ext.config import from_dict
from megatron_ext.parallel import ParallelSizes
from megatron_ext.parallel.state import parallel_job
from megatron_ext.run import RunConfig
from megatron_ext.run.builder import build_model
from megatron_ext.training.checkpoint import CheckpointManager, CommonState
from tests.configs import TINY

root = Path(sys.argv[1])
with parallel_job(ParallelSizes()):
    model = build_model(from_dict(RunConfig, TINY), cuda=False)
    manager = CheckpointManager(root / "checkpoints", keep_last=1)
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def hung_write(*args, **kwargs):  # a write that never returns (a hung filesystem)
        (root / f"writer.{os.getpid()}").write_text("")
        while True:
            time.sleep(0.1)

    filesystem_async._write_item = hung_write
    manager.save(1, model, None, CommonState())
"""


def test_checkpoint_writers_die_with_their_rank(tmp_path):
    rank = subprocess.Popen([sys.executable, "-c", STUCK_SAVE, str(tmp_path)], cwd=REPO)
    writers = []
    try:
        deadline = time.monotonic() + 240
        while not writers and time.monotonic() < deadline and rank.poll() is None:
            writers = [int(p.name.split(".")[1]) for p in tmp_path.glob("writer.*")]
            time.sleep(0.1)
        assert writers, "no checkpoint writer started"
        rank.kill()  # SIGKILL mid-save
        rank.wait()
    finally:
        if rank.poll() is None:
            rank.kill()
    assert _wait_gone(writers) == [], "a checkpoint writer outlived its rank"


def test_launcher_mpi_under_torchrun_is_refused(tmp_path):
    config, run_dir = _config(tmp_path), tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.launch", "--standalone", "--nproc-per-node", "1", "-m", "pretrain.train"]
    out = subprocess.run(
        cmd + ["--config", str(config), "--run-dir", str(run_dir), "--launcher", "mpi"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "use --launcher torchrun" in out.stderr, out.stderr
    assert not run_dir.exists()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    out = subprocess.run(
        torchrun + ["-m", "pretrain.train", "--config", str(config), "--run-dir", str(run_dir), "--launcher", "mpi"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode != 0 and "started by torchrun" in out.stderr and "use --launcher torchrun" in out.stderr
    assert not run_dir.exists()
