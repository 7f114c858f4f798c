"""Checkpoint cost, measured side by side on a ~1 GB checkpoint (a ~90M-parameter model and its Adam
state, fp32), one rank:

    save       CheckpointManager.save with integrity (XXH3-128 taken as the writers write, manifest)
               / the same save without it (Megatron's own writer, no manifest)          target <= 1.1
    resume     verify the manifest, then load / load alone                               target <= 1.1
    sha256     the previous integrity for reference: SHA-256 of every file read back after the save,
               and again before the load (ratios to the same baselines)                  report
    lost       training time lost to one save in a run of steps: (steps with a save) - (steps without),
               asynchronous (checkpoint.async_save) / synchronous                       report

The files of a resume are read right after their save has been written back (from the page cache, as
a resume on the same node would); a resume from cold storage pays the disk's read time on both sides.
On a machine shared with other work the ratios carry its noise: the cases are interleaved so that it
hits both alike. Each target is a ratio of medians: a save or a load varies by +-20 % from one to the
next (memory, page cache, writeback), too much for a ratio per repetition.

    python -m benchmarks.checkpoint_bench [--reps 3]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Callable, Dict, List, Tuple

import torch

from benchmarks.common import command_line, row, single_process_megatron

SHAPE = dict(
    num_layers=6,
    hidden_size=1024,
    num_attention_heads=16,
    num_query_groups=16,
    ffn_hidden_size=2816,
    vocab_size=8192,
    attention_dropout=0.0,
    hidden_dropout=0.0,
)
SEQ, MICRO_BATCH = 128, 1
STEPS, SAVE_AFTER = 5, 1
"""Steps of a timed training stretch, and the step after which its save starts."""
RESUMES = 4
"""Resumes of each kind per repetition (one save each)."""


def run_config():
    from megatron_ext.config import from_dict
    from megatron_ext.run import RunConfig

    return from_dict(
        RunConfig,
        {
            "model": SHAPE,
            "data": {"seq_length": SEQ},
            "train": {"micro_batch_size": MICRO_BATCH, "global_batch_size": MICRO_BATCH},
        },
    )


class Training:
    """The model, its optimizer and a fixed batch: ``step()`` runs one optimizer step."""

    def __init__(self, cfg):
        from megatron_ext.data.synthetic import SyntheticMotifDataset, step_micro_batches
        from megatron_ext.optim import build_optimizer
        from megatron_ext.parallel.state import comm_device
        from megatron_ext.run.builder import build_model
        from megatron_ext.training.ddp import wrap_with_ddp
        from megatron_ext.training.loop import optimizer_config

        cuda = torch.cuda.is_available()
        opt_config = optimizer_config(cfg, cuda)
        self.model = wrap_with_ddp(build_model(cfg, cuda=cuda), use_distributed_optimizer=False)
        self.optimizer = build_optimizer(opt_config, self.model)
        dataset = SyntheticMotifDataset(cfg.model.vocab_size, SEQ, cfg.train.seed)
        self.batches = list(step_micro_batches(dataset, 0, MICRO_BATCH, MICRO_BATCH, 0, 1, device=comm_device()))
        self.step()  # the optimizer's state exists from the first step on

    def step(self) -> None:
        from megatron_ext.training.step import train_step

        train_step(
            self.model, self.optimizer, iter(self.batches), num_microbatches=1, seq_length=SEQ, micro_batch_size=1
        )


@contextmanager
def without_integrity():
    """The save as it would be without integrity: Megatron's own writer (no checksum as it writes) and
    no manifest (the same publishing otherwise)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_ext.training import checkpoint

    writer = filesystem_async.FileSystemWriterAsync
    ours, manifest = writer.write_preloaded_data, checkpoint.write_manifest
    writer.write_preloaded_data = staticmethod(ours.__wrapped__)
    checkpoint.write_manifest = lambda directory: None
    try:
        yield
    finally:
        writer.write_preloaded_data = staticmethod(ours)
        checkpoint.write_manifest = manifest


def _sha256_all(directory: Path) -> None:
    for path in sorted(directory.iterdir()):
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def save_and_resume(training: Training, root: Path, reps: int) -> Tuple[Dict[str, List[float]], int]:
    """Per repetition (cases alternating): save with and without integrity, resume with and without
    verification, and the SHA-256 read-back the previous version paid on each side; and the size of
    the checkpoint in bytes."""
    from megatron_ext.training.checkpoint import CheckpointManager, CommonState, verify_checkpoint

    manager = CheckpointManager(root, keep_last=2)
    model, optimizer = training.model, training.optimizer
    times: Dict[str, List[float]] = {k: [] for k in ("save_plain", "save_ours", "resume_plain", "resume_ours", "sha")}
    step = 0

    def save(name: str) -> Path:
        nonlocal step
        step += 1
        if name == "save_plain":
            with without_integrity():
                seconds = _timed(lambda: manager.save(step, model, optimizer, CommonState()))
        else:
            seconds = _timed(lambda: manager.save(step, model, optimizer, CommonState()))
        times[name].append(seconds)
        return manager.latest()

    for rep in range(reps + 1):  # the first repetition warms up and is dropped
        # A B B A, then B A A B: the first save of a repetition (after the loads) runs slower, and each
        # case takes that place equally often. The last two saves are kept: one of each.
        order = ["save_plain", "save_ours"] if rep % 2 == 0 else ["save_ours", "save_plain"]
        saved = {name: save(name) for name in order + order[::-1]}
        path = saved["save_ours"]  # resumed both ways, in alternating order
        # The saves' dirty pages are written back first: the kernel's writeback of ~2 GB would otherwise
        # run during whichever resume comes first (a resume in a new job finds the files long written).
        os.sync()
        if verify_checkpoint(path) is not None:
            raise RuntimeError(f"{path} does not verify: {verify_checkpoint(path)}")
        resumes = {
            "resume_plain": lambda: manager.load(path, model, optimizer, load_optimizer=True),
            "resume_ours": lambda: (verify_checkpoint(path), manager.load(path, model, optimizer, load_optimizer=True)),
        }
        # The first load after a save runs slower (its memory is fresh) whichever case it is: an untimed
        # load takes that place, so that neither case pays it. A load varies by +-20 % from one to the
        # next: each case is timed RESUMES times, alternating.
        manager.load(path, model, optimizer, load_optimizer=True)
        for _ in range(RESUMES):
            for name in resumes if rep % 2 == 0 else reversed(list(resumes)):
                times[name].append(_timed(resumes[name]))
        times["sha"].append(_timed(lambda: _sha256_all(path)))
    size = sum(p.stat().st_size for p in path.iterdir())
    per_rep = {"save_plain": 2, "save_ours": 2, "resume_plain": RESUMES, "resume_ours": RESUMES}
    return {name: values[per_rep.get(name, 1) :] for name, values in times.items()}, size


def training_lost(training: Training, root: Path, reps: int) -> Dict[str, List[float]]:
    """Per repetition: STEPS training steps without a save, with a synchronous and with an asynchronous
    save after step SAVE_AFTER (the asynchronous one polled at every step, as the loop does)."""
    from megatron_ext.training.checkpoint import CheckpointManager, CommonState

    managers = {
        "sync": CheckpointManager(root / "sync", keep_last=1),
        "async": CheckpointManager(root / "async", keep_last=1, async_save=True),
    }
    times: Dict[str, List[float]] = {"none": [], "sync": [], "async": [], "async_wait": []}

    def stretch(mode: str) -> None:
        manager = managers.get(mode)
        start = time.perf_counter()
        for i in range(1, STEPS + 1):
            training.step()
            if manager is not None:
                manager.finalize(blocking=False)
                if i == SAVE_AFTER:
                    manager.save(i, training.model, training.optimizer, CommonState())
        times[mode].append(time.perf_counter() - start)
        if mode == "async":  # published after the steps: how long the writer still needed
            times["async_wait"].append(_timed(lambda: manager.finalize(blocking=True)))

    for rep in range(reps + 1):
        for mode in ("none", "sync", "async") if rep % 2 == 0 else ("async", "sync", "none"):
            stretch(mode)
    return {name: values[1:] for name, values in times.items()}


def run(reps: int = 3) -> List[Dict[str, object]]:
    single_process_megatron()
    training = Training(run_config())
    root = Path(tempfile.mkdtemp(prefix="checkpoint-bench-"))
    try:
        t, size = save_and_resume(training, root / "saves", reps)
        lost = training_lost(training, root / "training", reps)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def ratio(a: List[float], b: List[float]) -> float:
        return median(a) / median(b)

    sha_save = [median(t["save_plain"]) + s for s in t["sha"]]
    sha_resume = [median(t["resume_plain"]) + s for s in t["sha"]]
    lost_sync = [s - n for s, n in zip(lost["sync"], lost["none"])]
    lost_async = [a - n for a, n in zip(lost["async"], lost["none"])]
    gib = size / 2**30
    return [
        row(
            "checkpoint",
            f"save with integrity / without ({gib:.2f} GiB checkpoint)",
            ratio(t["save_ours"], t["save_plain"]),
            "<= 1.1",
        ),
        row(
            "checkpoint",
            "resume with verification / without",
            ratio(t["resume_ours"], t["resume_plain"]),
            "<= 1.1",
        ),
        row(
            "checkpoint",
            "save with SHA-256 read back (previous version) / without",
            ratio(sha_save, t["save_plain"]),
            "report",
        ),
        row(
            "checkpoint",
            "resume with SHA-256 verification (previous version) / without",
            ratio(sha_resume, t["resume_plain"]),
            "report",
        ),
        row("checkpoint", "save without integrity, seconds", median(t["save_plain"]), "report"),
        row("checkpoint", "save with integrity, seconds", median(t["save_ours"]), "report"),
        row("checkpoint", "resume without verification, seconds", median(t["resume_plain"]), "report"),
        row("checkpoint", "resume with verification, seconds", median(t["resume_ours"]), "report"),
        row(
            "checkpoint",
            f"training time lost to a save, seconds: synchronous ({STEPS} steps)",
            median(lost_sync),
            "report",
        ),
        row(
            "checkpoint",
            f"training time lost to a save, seconds: asynchronous ({STEPS} steps)",
            median(lost_async),
            "report",
        ),
        row(
            "checkpoint",
            "training time lost to a save: asynchronous / synchronous",
            ratio(lost_async, lost_sync),
            "report",
        ),
        row(
            "checkpoint",
            "asynchronous save still writing when the steps end, seconds",
            median(lost["async_wait"]),
            "report",
        ),
        row("checkpoint", f"{STEPS} training steps without a save, seconds", median(lost["none"]), "report"),
    ]


if __name__ == "__main__":
    command_line(run, __doc__, default_reps=3)
