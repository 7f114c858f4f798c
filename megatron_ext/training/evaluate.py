"""Validation loss of a run directory's latest checkpoint (weights and the capabilities' model
structure: hybrid attention allocation, grown loops), on this job's layout."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_ext.config import RunConfig


def evaluate_checkpoint(cfg: RunConfig, run_dir: Path, num_batches: int) -> float:
    """Mean loss over ``num_batches`` global validation batches (needs the parallel state of
    ``cfg.parallel`` to be initialized)."""
    from megatron.core import parallel_state

    from megatron_ext.data.builder import build_datasets
    from megatron_ext.data.synthetic import step_micro_batches
    from megatron_ext.models.builder import build_model
    from megatron_ext.parallel.state import comm_device
    from megatron_ext.training.capabilities import restore_capabilities
    from megatron_ext.training.checkpoint import CheckpointManager
    from megatron_ext.training.step import eval_step

    model = build_model(cfg, cuda=torch.cuda.is_available())
    manager = CheckpointManager(Path(run_dir) / "checkpoints", cfg.checkpoint.keep_last)
    latest = manager.latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    common = manager.load(latest, model, None, load_optimizer=False)
    restore_capabilities(cfg, model, common, Path(run_dir))  # hybrid allocation, grown loops
    t = cfg.train
    _, valid = build_datasets(cfg)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_micro = t.global_batch_size // (t.micro_batch_size * dp_size)
    losses = []
    for i in range(num_batches):
        batches = list(step_micro_batches(valid, i * t.global_batch_size, t.global_batch_size,
                                          t.micro_batch_size, dp_rank, dp_size, device=comm_device()))
        iterator = [iter(batches) for _ in model] if len(model) > 1 else iter(batches)
        losses.append(eval_step(model, iterator, num_microbatches=num_micro, seq_length=cfg.data.seq_length,
                                micro_batch_size=t.micro_batch_size))
    return sum(losses) / len(losses)
