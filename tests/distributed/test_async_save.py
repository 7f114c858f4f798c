"""``checkpoint.async_save``: training goes on while a checkpoint is written, and the checkpoint is the
state of its step (the writer works from a copy-on-write image of that moment), published only once
written: a run resumed from it has the losses of a run never stopped; a stop signal waits for the save
in flight; a crash during an asynchronous save leaves the previous checkpoint the latest."""

import functools
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from megatron_ext.capability import Callback
from megatron_ext.config import ConfigError, from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import DistributedTaskError, run_distributed
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

CONFIG = merge(
    TINY,
    {
        "model": {"num_query_groups": None},
        "data": {"kind": "synthetic"},
        "train": {"global_batch_size": 4, "steps": 6, "warmup_steps": 1, "eval_interval": 0},
        "checkpoint": {"save_interval": 2, "keep_last": 3, "save_at_end": True},
    },
)
WRITE_DELAY = 1.5
"""Seconds each writer process of a slowed save waits: long enough for steps to run meanwhile."""


def _slow_writes():
    """Each writer process a save forks waits before its first write: a slow disk."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    write = filesystem_async._write_item
    if getattr(write, "slowed", False):
        return
    waited = set()

    @functools.wraps(write)  # Megatron reads its signature
    def slow_write(*args, **kwargs):
        if os.getpid() not in waited:
            waited.add(os.getpid())
            time.sleep(WRITE_DELAY)
        return write(*args, **kwargs)

    slow_write.slowed, slow_write.original = True, write
    filesystem_async._write_item = slow_write


def _restore_writes():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async._write_item, "slowed", False):
        filesystem_async._write_item = filesystem_async._write_item.original


class StopAt(Callback):
    """Sends this rank SIGTERM at the end of step ``step`` (a preemption notice)."""

    name = "stop_at"

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, ctx, result):
        if ctx.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}


def _train(run_dir, steps, async_save, slow=False, callbacks=()):
    from megatron_ext.training.loop import Trainer

    lines = []
    cfg = from_dict(
        RunConfig,
        {
            **CONFIG,
            "train": {**CONFIG["train"], "steps": steps},
            "checkpoint": {**CONFIG["checkpoint"], "async_save": async_save},
        },
    )
    if slow:
        _slow_writes()
    try:
        summary = Trainer(cfg, Path(run_dir), callbacks=list(callbacks), log=lines.append).run()
    finally:
        _restore_writes()
    return summary.losses, lines


def _manifest(step_dir: Path):
    return json.loads((step_dir / "manifest.json").read_text())["files"]


def async_then_resume(root):
    root = Path(root)
    straight, _ = _train(root / "straight", 4, async_save=False)
    run = root / "run"
    first, lines = _train(run, 4, async_save=True, slow=True)  # saves at 2 and 4, written while steps go on
    checkpoints = run / "checkpoints"
    published = {p.name: _manifest(p) for p in sorted(checkpoints.glob("step_*"))}
    leftovers = sorted(p.name for p in checkpoints.rglob("*") if p.name.startswith(".tmp-") or ".xxh3" in p.name)
    # Resume from step 2, the checkpoint written while steps 3 and 4 trained.
    if torch.distributed.get_rank() == 0:
        (checkpoints / "latest").write_text("step_00000002")
        shutil.rmtree(checkpoints / "step_00000004")
    torch.distributed.barrier()
    resumed, _ = _train(run, 4, async_save=True)
    return {
        "straight": straight,
        "first": first,
        "resumed": resumed,
        "lines": lines,
        "published": published,
        "leftovers": leftovers,
        "steps": [r["step"] for r in read_metrics(run / "metrics.jsonl")],
    }


def test_an_async_save_lets_training_go_on_and_resumes_bitwise(tmp_path):
    out = run_distributed(async_then_resume, 2, None, timeout=600, root=str(tmp_path))[0]  # three runs
    assert out["first"] == out["straight"]
    assert out["resumed"] == out["straight"][2:], "the step-2 checkpoint holds step 2's state, not a later one"
    assert out["steps"] == [1, 2, 3, 4]
    lines = out["lines"]
    scheduled = lines.index(next(x for x in lines if x.startswith("saving checkpoint") and "step_00000002" in x))
    published = lines.index(next(x for x in lines if x.startswith("saved checkpoint") and "step_00000002" in x))
    trained = [i for i, x in enumerate(lines) if x.lstrip().startswith("step") and "/4 |" in x]
    assert any(scheduled < i < published for i in trained), f"no step ran while step 2 was saved: {lines}"
    assert sorted(out["published"]) == ["step_00000002", "step_00000004"]
    for files in out["published"].values():
        assert files and all(set(entry) == {"bytes", "xxh3_128"} for entry in files.values()), files
    assert out["leftovers"] == []


def signalled_during_async_save(run_dir):
    # Step 2's save is slow; SIGTERM at step 3: the run checkpoints step 3 after step 2's save is published.
    losses, lines = _train(run_dir, 6, async_save=True, slow=True, callbacks=[StopAt(3)])
    checkpoints = Path(run_dir) / "checkpoints"
    return losses, lines, (checkpoints / "latest").read_text(), sorted(p.name for p in checkpoints.iterdir())


def test_a_stop_signal_waits_for_the_save_in_flight(tmp_path):
    losses, lines, latest, entries = run_distributed(signalled_during_async_save, 1, None, run_dir=str(tmp_path))[0]
    assert len(losses) == 3
    assert latest == "step_00000003" and entries == ["latest", "step_00000002", "step_00000003"], entries
    saved = [x for x in lines if x.startswith("saved checkpoint")]
    assert [Path(x.split()[-1]).name for x in saved] == ["step_00000002", "step_00000003"], lines


def crash_during_async_save(root):
    from megatron_ext.training import checkpoint
    from tests.distributed.test_checkpoint_crash import _build

    model, optimizer = _build(seed=1)
    manager = checkpoint.CheckpointManager(Path(root), keep_last=2, async_save=True)
    manager.save(1, model, optimizer, checkpoint.CommonState(consumed_samples=8))
    manager.finalize(blocking=True)
    _slow_writes()
    manager.save(2, model, optimizer, checkpoint.CommonState(consumed_samples=16))
    os._exit(17)  # the rank dies while step 2 is being written


def load_latest(root):
    from megatron_ext.training import checkpoint
    from tests.distributed.test_checkpoint_crash import _build

    model, optimizer = _build(seed=2)
    manager = checkpoint.CheckpointManager(Path(root), keep_last=2)
    latest = manager.latest_verified()
    return latest.name, manager.load(latest, model, optimizer, load_optimizer=True).consumed_samples


def test_a_crash_during_an_async_save_keeps_the_previous_checkpoint(tmp_path):
    with pytest.raises(DistributedTaskError, match="worker process died"):
        run_distributed(crash_during_async_save, 1, root=str(tmp_path))
    time.sleep(WRITE_DELAY)  # the writer of step 2 dies with its rank: nothing publishes it later
    assert (tmp_path / "latest").read_text() == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()
    assert run_distributed(load_latest, 1, root=str(tmp_path))[0] == ("step_00000001", 8)


def test_async_save_without_a_gpu_needs_the_cpu_mode(monkeypatch):
    from megatron_ext.compat import cpu
    from megatron_ext.training import checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "cpu_support_active", lambda: False)
    with pytest.raises(ConfigError, match="checkpoint.async_save=true needs a GPU or the CPU mode"):
        checkpoint.CheckpointManager(Path("unused"), keep_last=1, async_save=True)
