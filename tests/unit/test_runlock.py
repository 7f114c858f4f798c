"""The run-directory lock: held by one process at a time, the holder named to whoever else asks, a
lock left by a process that died taken over with a warning, and a run directory that is a file
refused with a message."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.training.runlock import LOCK_FILE, RunDirectoryError, RunLock, holder

REPO = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys, time\n"
    "from megatron_ext.training.runlock import RunLock\n"
    "RunLock.take(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def _hold(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_names_its_holder_and_refuses_a_second_job(tmp_path):
    run_dir = tmp_path / "run"
    proc = _hold(run_dir)
    try:
        record = json.loads((run_dir / LOCK_FILE).read_text())
        assert record["pid"] == proc.pid
        message = holder(run_dir)
        assert message and f"pid {proc.pid}" in message and record["host"] in message and "in use" in message
        with pytest.raises(RunDirectoryError, match=f"pid {proc.pid}"):
            RunLock.take(run_dir)
    finally:
        proc.kill()
        proc.wait()
    # The holder was killed: its lock is stale, taken over with a warning naming it.
    assert holder(run_dir) is None
    warnings = []
    lock = RunLock.take(run_dir, warn=warnings.append)
    assert len(warnings) == 1 and "taking over" in warnings[0] and f"pid {proc.pid}" in warnings[0], warnings
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert (run_dir / LOCK_FILE).read_text() == ""  # a clean release leaves nothing to take over
    warnings.clear()
    RunLock.take(run_dir, warn=warnings.append).release()
    assert warnings == []


def test_a_run_directory_that_is_a_file_is_refused_with_a_message(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirectoryError, match="is a file, not a directory"):
        RunLock.take(blocker)
    with pytest.raises(RunDirectoryError, match="cannot be created"):
        RunLock.take(blocker / "sub")
    assert blocker.read_text() == "not a directory"
