"""Hangs are bounded and named: ``train.distributed_timeout_minutes`` is the timeout of every process
group (the world's and Megatron's), and a rank stuck mid-step makes the step watchdog of every rank
report the rank behind and its phase, dump the Python stacks, and exit with status 75."""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

from megatron_ext.capability import Callback
from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from tests.configs import TINY, merge

REPO = Path(__file__).resolve().parents[2]
CONFIG = merge(
    TINY,
    {
        "model": {"num_query_groups": None},
        "data": {"kind": "synthetic"},
        "train": {"global_batch_size": 4, "steps": 40, "warmup_steps": 1, "eval_interval": 0},
        "checkpoint": {"save_interval": 0, "save_at_end": False},
        "logging": {"log_interval": 1},
    },
)


class RecordTimeouts(Callback):
    """Every process group's collective timeout, in seconds, at the start of training."""

    name = "record_timeouts"

    def __init__(self):
        self.timeouts = {}

    def on_train_start(self, ctx):
        import torch

        for group in dist.distributed_c10d._world.pg_map:
            backend = group._get_backend(torch.device("cpu"))
            self.timeouts[group.group_name] = backend.options._timeout.total_seconds()


def record_timeouts(run_dir, minutes):
    from megatron_ext.training.loop import Trainer

    recorder = RecordTimeouts()
    cfg = merge(CONFIG, {"train": {"steps": 2, "distributed_timeout_minutes": minutes}})
    Trainer(from_dict(RunConfig, cfg), Path(run_dir), callbacks=[recorder], log=lambda line: None).run()
    return recorder.timeouts


TIMEOUTS = """
import json, sys
from tests.distributed.test_hangs import record_timeouts
print(json.dumps(record_timeouts(sys.argv[1], 3)))
"""


def test_every_process_group_has_the_configured_timeout(tmp_path):
    # A process of its own: the world group is created by the trainer, as in a real job.
    done = subprocess.run(
        [sys.executable, "-c", TIMEOUTS, str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    timeouts = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[timeouts] {timeouts}")
    assert len(timeouts) > 3, "the world and Megatron's groups"
    assert set(timeouts.values()) == {180.0}, timeouts


class HangAt(Callback):
    """Rank ``rank`` never finishes the metrics of step ``step`` (a deadlock, a hung read)."""

    name = "hang_at"

    def __init__(self, rank, step):
        self.rank, self.step = rank, step

    def on_step_end(self, ctx, result):
        if dist.get_rank() == self.rank and ctx.step == self.step:
            hang_here()
        return {}


def hang_here():
    while True:
        time.sleep(0.1)


def hung_run(run_dir):
    from megatron_ext.training.loop import Trainer

    cfg = merge(CONFIG, {"train": {"hang_factor": 5.0, "hang_min_seconds": 2.0}})
    Trainer(from_dict(RunConfig, cfg), Path(run_dir), callbacks=[HangAt(1, 6)], log=lambda line: None).run()


HUNG = """
import sys
from megatron_ext.testing.distributed import run_distributed
from tests.distributed.test_hangs import hung_run
run_distributed(hung_run, 2, None, run_dir=sys.argv[1], timeout=300)
"""


def test_a_rank_stuck_mid_step_is_named_and_the_job_ends(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", HUNG, str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    err = done.stderr
    assert done.returncode != 0 and "worker process died" in err, err[-3000:]
    reports = [line for line in err.splitlines() if line.startswith("watchdog: ")]
    print("[watchdog]\n" + "\n".join(reports))
    # Each rank's watchdog reports what the store says; the first to exit ends the job, so which
    # ranks get to print depends on the machine's load: any report must name the rank behind.
    named = [
        line
        for line in reports
        if "rank 1 is behind, in phase 'metrics' of step 6" in line
        and "rank 0: 'log' of step 6" in line
        and "exiting with status 75" in line
    ]
    assert named, reports
    assert "in hang_here" in err and ("Current thread" in err or "Thread 0x" in err), err[-3000:]  # the stacks
