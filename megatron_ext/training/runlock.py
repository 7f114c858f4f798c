"""One job per run directory: an advisory lock that the job's rank 0 holds for the run's life.

``<run-dir>/.lock`` is locked with ``fcntl.lockf`` (a POSIX record lock: the kernel releases it when
the holding process ends, however it ends, and forked children such as checkpoint writers do not
inherit it; NFS supports it through its lock manager). The holder writes its host, pid and start
time into the file and empties it on a clean release, so that:

* a second job finds the lock held and stops with a message naming the holder, before it writes
  anything (exit status 2 from the entry points);
* a job that finds the lock free but the file still naming a holder knows that holder died without
  releasing it (SIGKILL, node failure), takes the lock over and says so.

A filesystem without record locks (some parallel filesystems mounted without ``flock``) cannot
enforce the lock: the job goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

LOCK_FILE = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
_HELD = (errno.EACCES, errno.EAGAIN)


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used: another job holds it, or it cannot be created or written."""


def _describe(text: str) -> str:
    """The holder recorded in a lock file, in words."""
    try:
        holder = json.loads(text)
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _open_lock_file(run_dir: Path, create: bool) -> Optional[int]:
    """A read-write descriptor of the lock file (None when it does not exist and ``create`` is off);
    a run directory that is not a usable directory raises :class:`RunDirectoryError`."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"the run directory {run_dir} is a file, not a directory: pass another --run-dir")
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        elif not (run_dir / LOCK_FILE).exists():
            return None
        return os.open(run_dir / LOCK_FILE, os.O_RDWR | (os.O_CREAT if create else 0) | os.O_CLOEXEC, 0o644)
    except (NotADirectoryError, FileExistsError):
        raise RunDirectoryError(
            f"the run directory {run_dir} cannot be created: a file stands in its path; pass another --run-dir"
        ) from None
    except PermissionError:
        raise RunDirectoryError(
            f"the run directory {run_dir} is not writable by this user: fix its permissions or pass another --run-dir"
        ) from None
    except OSError as err:
        raise RunDirectoryError(f"the run directory {run_dir} cannot be used ({err.strerror}): pass another --run-dir")


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


def _in_use(run_dir: Path, fd: int) -> RunDirectoryError:
    return RunDirectoryError(
        f"the run directory {run_dir} is in use by another job ({_describe(_read(fd))}; lock file "
        f"{run_dir / LOCK_FILE}): wait for that job to end, stop it, or pass another --run-dir"
    )


def holder(run_dir: Path) -> Optional[str]:
    """Without taking it: who holds the lock of ``run_dir`` (in words), or None when it is free or does
    not exist. Raises :class:`RunDirectoryError` when ``run_dir`` is not a usable directory."""
    fd = _open_lock_file(Path(run_dir), create=False)
    if fd is None:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in _HELD:
            return str(_in_use(Path(run_dir), fd))
        return None
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """The lock of one run directory, as this process holds it (or an empty stand-in on other ranks)."""

    def __init__(self, fd: Optional[int] = None):
        self._fd = fd

    @classmethod
    def take(cls, run_dir: Path, warn: Callable[[str], None] = print) -> RunLock:
        """Take the lock of ``run_dir`` (created if needed) in this process, or raise
        :class:`RunDirectoryError` naming the holder."""
        run_dir = Path(run_dir)
        fd = _open_lock_file(run_dir, create=True)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in _HELD:
                error = _in_use(run_dir, fd)
                os.close(fd)
                raise error from None
            if err.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            warn(
                f"warning: the filesystem of {run_dir} has no record locks ({err.strerror}): nothing stops a "
                "second job from using this run directory at the same time"
            )
        previous = _read(fd)
        if previous:
            warn(
                f"warning: taking over the lock of {run_dir} from a job that ended without releasing it "
                f"({_describe(previous)})"
            )
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as err:  # a full filesystem: the file is created, its record cannot be written
            os.close(fd)
            raise RunDirectoryError(
                f"the run directory {run_dir} cannot be written ({err.strerror}): stopping before training; free "
                "space on its filesystem, or pass another --run-dir"
            ) from None
        return cls(fd)

    def release(self) -> None:
        """Empty the holder record and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass  # the kernel releases it when the descriptor closes anyway
        finally:
            os.close(self._fd)
            self._fd = None


def lock_run_directory(run_dir: Path, log: Callable[[str], None] = print) -> RunLock:
    """Every rank: rank 0 takes the lock of ``run_dir``; when it cannot, every rank raises the same
    :class:`RunDirectoryError` (collective when a process group exists)."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    lock, problem = RunLock(), None
    if rank0:
        try:
            lock = RunLock.take(run_dir, warn=log)
        except RunDirectoryError as err:
            problem = str(err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        raise RunDirectoryError(problem)
    return lock
