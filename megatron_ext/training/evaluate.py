"""Validation loss of a run directory's latest checkpoint (its weights and the structure the
capabilities trained into it), on this job's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_ext.run import RunConfig


def load_trained(cfg: RunConfig, run_dir: Path, step: Optional[int] = None, *, cuda: bool = False):
    """The model chunks of ``cfg`` (this job's layout) with the weights of ``run_dir``'s checkpoint
    (latest or ``step``) and the structure its capabilities trained into them; returns
    ``(chunks, {capability name: callback}, common state)``. Needs the parallel state of ``cfg``."""
    from megatron_ext.models.builder import build_model
    from megatron_ext.training.capabilities import restore_capabilities
    from megatron_ext.training.checkpoint import CheckpointManager

    root = Path(run_dir) / "checkpoints"
    manager = CheckpointManager(root, cfg.checkpoint.keep_last)
    path = manager.latest() if step is None else root / f"step_{step:08d}"
    if path is None or not (path / "common.pt").is_file():
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {root}")
    model = build_model(cfg, cuda=cuda, perform_initialization=False)
    common = manager.load(path, model, None, load_optimizer=False)
    callbacks = restore_capabilities(cfg, model, common, Path(run_dir))
    return model, callbacks, common


def evaluate_checkpoint(cfg: RunConfig, run_dir: Path, num_batches: int) -> float:
    """Mean loss over ``num_batches`` global validation batches (needs the parallel state of
    ``cfg.parallel`` to be initialized)."""
    from megatron.core import parallel_state

    from megatron_ext.data.builder import build_datasets
    from megatron_ext.parallel.state import comm_device
    from megatron_ext.training.step import eval_step, global_batch_iterator, run_forward_step

    model, _, _ = load_trained(cfg, run_dir, cuda=torch.cuda.is_available())
    t = cfg.train
    _, valid = build_datasets(cfg)
    num_micro = t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())
    forward_step = run_forward_step(cfg, comm_device())
    losses = [eval_step(model, global_batch_iterator(valid, i * t.global_batch_size, cfg, len(model), comm_device()),
                        num_microbatches=num_micro, seq_length=cfg.data.seq_length,
                        micro_batch_size=t.micro_batch_size, forward_step_func=forward_step)
              for i in range(num_batches)]
    return sum(losses) / len(losses)
