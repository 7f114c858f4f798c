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
    from megatron_ext.run.builder import build_model
    from megatron_ext.training.capabilities import restore_capabilities
    from megatron_ext.training.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint

    root = Path(run_dir) / "checkpoints"
    manager = CheckpointManager(root, cfg.checkpoint.keep_last)
    path = manager.latest_verified() if step is None else root / f"step_{step:08d}"
    if path is None or not (path / "common.pt").is_file():
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {root}")
    problem = verify_checkpoint(path) if step is not None else None
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    model = build_model(cfg, cuda=cuda, perform_initialization=False)
    common = manager.load(path, model, None, load_optimizer=False)
    callbacks = restore_capabilities(cfg, model, common, Path(run_dir))
    return model, callbacks, common


def apply_subnetwork(cfg: RunConfig, model_chunks: list, sub) -> None:
    """Make the full model compute the sub-network ``sub`` (kept layers; with MoE kept experts and a
    top-k): by the capability that owns it (elastic MoE), else by skipping the other layers."""
    from megatron_ext.compat.layers import skip_layer
    from megatron_ext.training.extract import check_subnetwork

    check_subnetwork(cfg, sub)
    if any(capability.apply_subnetwork(cfg, model_chunks, sub) for capability in cfg.capabilities):
        return
    kept = set(sub.layers)
    for chunk in model_chunks:
        for layer in getattr(chunk, "module", chunk).decoder.layers:
            if layer.layer_number - 1 not in kept:
                skip_layer(layer)


def evaluate_checkpoint(cfg: RunConfig, run_dir: Path, num_batches: int, sub=None, step: Optional[int] = None) -> float:
    """Mean loss of ``run_dir``'s latest (or ``step``'s) checkpoint over ``num_batches`` global
    validation batches (needs the parallel state of ``cfg.parallel`` to be initialized); with ``sub``,
    of the full model under that sub-network, which equals the loss of the sub-model
    ``pretrain.extract`` writes for it."""
    from megatron.core import parallel_state

    from megatron_ext.parallel.state import comm_device
    from megatron_ext.run.datasets import build_datasets
    from megatron_ext.training.step import eval_step, global_batch_iterator, run_forward_step

    model, _, _ = load_trained(cfg, run_dir, step, cuda=torch.cuda.is_available())
    if sub is not None:
        apply_subnetwork(cfg, model, sub)
    t = cfg.train
    _, valid = build_datasets(cfg, valid_samples=num_batches * t.global_batch_size)
    num_micro = t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())
    forward_step = run_forward_step(cfg, comm_device())
    losses = [
        eval_step(
            model,
            global_batch_iterator(valid, i * t.global_batch_size, cfg, len(model), comm_device()),
            num_microbatches=num_micro,
            seq_length=cfg.data.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_step_func=forward_step,
        )
        for i in range(num_batches)
    ]
    return sum(losses) / len(losses)
