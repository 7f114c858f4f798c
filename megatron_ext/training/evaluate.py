"""Validation loss of a run directory's latest checkpoint (its weights and the structure the
capabilities trained into it), on this job's layout."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_ext.run import RunConfig


def evaluate_checkpoint(cfg: RunConfig, run_dir: Path, num_batches: int) -> float:
    """Mean loss over ``num_batches`` global validation batches (needs the parallel state of
    ``cfg.parallel`` to be initialized)."""
    from megatron.core import parallel_state

    from megatron_ext.data.builder import build_datasets
    from megatron_ext.models.builder import build_model
    from megatron_ext.parallel.state import comm_device
    from megatron_ext.training.capabilities import restore_capabilities
    from megatron_ext.training.checkpoint import CheckpointManager
    from megatron_ext.training.step import eval_step, global_batch_iterator, run_forward_step

    model = build_model(cfg, cuda=torch.cuda.is_available())
    manager = CheckpointManager(Path(run_dir) / "checkpoints", cfg.checkpoint.keep_last)
    latest = manager.latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    common = manager.load(latest, model, None, load_optimizer=False)
    restore_capabilities(cfg, model, common, Path(run_dir))  # the trained structure of every capability
    t = cfg.train
    _, valid = build_datasets(cfg)
    num_micro = t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())
    forward_step = run_forward_step(cfg, comm_device())
    losses = [eval_step(model, global_batch_iterator(valid, i * t.global_batch_size, cfg, len(model), comm_device()),
                        num_microbatches=num_micro, seq_length=cfg.data.seq_length,
                        micro_batch_size=t.micro_batch_size, forward_step_func=forward_step)
              for i in range(num_batches)]
    return sum(losses) / len(losses)
