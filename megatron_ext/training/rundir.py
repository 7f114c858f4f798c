"""The run directory: resolved config, metrics.jsonl, TensorBoard events, plots (rank 0 writes).

metrics.jsonl holds one JSON object per logged step. On resume, records of steps after the
checkpoint being resumed (they will be produced again) are moved aside first, into
``metrics.after_step_<N>.jsonl`` (appended, never overwritten), so that metrics.jsonl always reads
as one uninterrupted run and no record is ever lost.

Before anything is written, the run directory and its ``checkpoints/`` (which may be a link to
another filesystem) must take a file: a read-only or full filesystem is refused up front, naming the
directory and the fix, instead of failing at the first save after hours of training. The check
writes and removes a small file: permission bits alone do not tell (root writes through them).
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch.distributed as dist

from megatron_ext.config import dump_yaml
from megatron_ext.training.runlock import RunDirectoryError

_PROBE_BYTES = 1 << 16
"""Written (and fsynced) to check that a directory takes data: a full filesystem refuses it."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


class RunDirectory:
    """Paths of a run directory and its writers (a no-op object on ranks other than 0)."""

    def __init__(self, path: Path, is_writer: bool):
        self.path = Path(path)
        self.is_writer = is_writer
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.plots = self.path / "plots"
        self._tensorboard = None
        problem = None
        if is_writer:
            problem = writable_problem(self.path, "the run directory") or writable_problem(
                self.checkpoints, "the checkpoint directory"
            )
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank refuses alike (rank 0 writes)
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem is not None:
            raise RunDirectoryError(problem)
        if is_writer:
            for sub in (self.path / "tensorboard", self.plots):
                sub.mkdir(parents=True, exist_ok=True)

    def write_config(self, config) -> None:
        if self.is_writer:
            dump_yaml(config, self.path / "config.yaml")

    def start_metrics(self, resumed_step: int, tensorboard: bool, log: Optional[Callable[[str], None]] = None) -> None:
        """Keep the records up to ``resumed_step`` and move the later ones aside (``log`` says so);
        open TensorBoard."""
        if not self.is_writer:
            return
        if self.metrics_path.exists():
            kept, later = [], []
            for line in self.metrics_path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    step = record.get("step", 0) if isinstance(record, dict) else None
                except json.JSONDecodeError:  # a line cut short by a crash
                    step = None
                (kept if isinstance(step, int) and step <= resumed_step else later).append(line)
            if later:
                aside = self.path / f"metrics.after_step_{resumed_step:08d}.jsonl"
                with open(aside, "a") as f:
                    f.write("".join(line + "\n" for line in later))
                if log is not None:
                    log(
                        f"moved {len(later)} metrics record(s) past step {resumed_step} from {self.metrics_path.name} "
                        f"to {aside.name} (this run continues from step {resumed_step})"
                    )
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            tmp.replace(self.metrics_path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.path / "tensorboard"), purge_step=resumed_step + 1)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.is_writer:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        if self._tensorboard is not None:
            step = record["step"]
            for key, value in record.items():
                if key == "step":
                    continue
                # A list-valued metric (one value per layer or unit) is one scalar per element.
                values = (
                    {f"{key}/{i}": v for i, v in enumerate(value)} if isinstance(value, (list, tuple)) else {key: value}
                )
                for name, v in values.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        self._tensorboard.add_scalar(name, v, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def writable_problem(directory: Path, what: str) -> Optional[str]:
    """Why ``directory`` (created if missing) cannot take this run's files, or None: found by writing,
    fsyncing and removing a small file in it. ``what`` names the directory in the message."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check-")
        try:
            if os.write(fd, bytes(_PROBE_BYTES)) != _PROBE_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        if err.errno == errno.EROFS:
            fix = "remount it read-write, or pass another --run-dir"
        elif err.errno in (errno.EACCES, errno.EPERM):
            fix = "fix its permissions, or pass another --run-dir"
        elif err.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space on its filesystem (or raise the quota), or pass another --run-dir"
        else:
            fix = "pass another --run-dir"
        return f"{what} {directory} cannot be written ({reason}): stopping before training; {fix}"
    return None


def read_metrics(path: Path) -> list:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
