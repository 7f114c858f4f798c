"""A run directory, or its ``checkpoints/`` on another filesystem, that cannot take the run's files (full,
or read-only) is refused before the first step, in one message naming the directory and the fix,
instead of failing at the first save after the training it was meant to keep.

The filesystems are real: a tmpfs filled to the last byte, and a read-only bind mount (the test runs as
root, which writes through permission bits). Without the right to mount, the full filesystem cannot
be made and its cases are skipped; a read-only directory is then made with permission bits, which bind
a user who is not root."""

import errno
import os
import subprocess
from pathlib import Path

import pytest

from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from tests.configs import TINY, merge

CONFIG = merge(
    TINY,
    {
        "model": {"num_query_groups": None},
        "data": {"kind": "synthetic"},
        "train": {"global_batch_size": 2, "steps": 2, "warmup_steps": 1, "eval_interval": 0},
        "checkpoint": {"save_interval": 1},
    },
)


def _mount(*args: str) -> bool:
    try:
        return subprocess.run(["mount", *args], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def _full_filesystem(path: Path) -> Path:
    """A 256 KiB tmpfs at ``path``, filled by one file until it refuses a byte more."""
    path.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)):
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN; no full filesystem can be made here")
    with open(path / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    return path


def _read_only(path: Path) -> Path:
    """``path`` holding one file, then read-only: a read-only bind mount of itself (as root), or without
    write permission (as another user)."""
    path.mkdir()
    (path / "kept").write_text("an earlier file")
    if os.geteuid() != 0:
        path.chmod(0o555)
    elif not (_mount("--bind", str(path), str(path)) and _mount("-o", "remount,bind,ro", str(path))):
        pytest.skip("a read-only bind mount needs CAP_SYS_ADMIN, and root writes through permission bits")
    return path


@pytest.fixture
def faulty(tmp_path, request):
    """The run directory of a case: ``(run_dir, faulty directory, fault)``; mounts are undone afterwards."""
    fault, where = request.param
    make = _full_filesystem if fault == "full" else _read_only
    try:
        if where == "run_dir":
            run_dir = make(tmp_path / "run")
            yield run_dir, run_dir, fault
        else:  # checkpoints/ is a link to another filesystem
            target = make(tmp_path / "elsewhere")
            run_dir = tmp_path / "run"
            run_dir.mkdir()
            (run_dir / "checkpoints").symlink_to(target)
            yield run_dir, run_dir / "checkpoints", fault
    finally:
        for mount in (tmp_path / "run", tmp_path / "elsewhere"):
            if os.geteuid() != 0 and mount.exists():
                mount.chmod(0o755)
            # A bind mount of a directory onto itself is on the same device: ismount does not see it.
            while mount.exists() and subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                pass


def train(run_dir):
    from megatron_ext.training.loop import Trainer
    from megatron_ext.training.runlock import RunDirectoryError

    cfg = from_dict(RunConfig, CONFIG)
    lines = []
    try:
        Trainer(cfg, Path(run_dir), log=lines.append).run()
    except RunDirectoryError as err:
        return str(err), lines
    return None, lines


CASES = [("full", "run_dir"), ("full", "checkpoints"), ("read_only", "run_dir"), ("read_only", "checkpoints")]


REASONS = {
    "full": ("No space left on device",),
    "read_only": ("Read-only file system", "not writable", "Permission denied"),
}


@pytest.mark.parametrize("faulty", CASES, ids=["-".join(case) for case in CASES], indirect=True)
def test_a_directory_that_cannot_take_the_run_is_refused_before_training(faulty):
    run_dir, bad, fault = faulty
    message, lines = run_distributed(train, 1, None, run_dir=str(run_dir))[0]
    print(f"[{fault}: {bad}] {message}")
    assert message is not None, f"the run trained: {lines}"
    assert str(bad) in message and "--run-dir" in message, message
    assert any(reason in message for reason in REASONS[fault]), message
    assert not [x for x in lines if x.lstrip().startswith("step")], lines
    assert not (run_dir / "metrics.jsonl").exists()
