"""The enabled capabilities' callbacks and batch hooks, and restoring their structure after a load."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List

from megatron_ext.capability import BatchHook, Callback, TrainContext
from megatron_ext.parallel.state import process_groups
from megatron_ext.run import RunConfig


def capability_callbacks(cfg: RunConfig, log: Callable = print) -> Dict[str, Callback]:
    """``{capability name: callback}`` of the enabled capabilities that have per-step logic, in
    registry order."""
    callbacks = {capability.name: capability.callback(cfg, log) for capability in cfg.capabilities}
    return {name: cb for name, cb in callbacks.items() if cb is not None}


def batch_hooks(cfg: RunConfig) -> List[BatchHook]:
    """What the forward step calls before each micro-batch's forward, in registry order."""
    hooks = [capability.batch_hook(cfg) for capability in cfg.capabilities]
    return [hook for hook in hooks if hook is not None]


def restore_capabilities(cfg: RunConfig, model_chunks: list, common: dict, run_dir: Path) -> Dict[str, Callback]:
    """Give model chunks loaded from a checkpoint the structure training left them in.

    A checkpoint's weights alone are not the trained model: the structure a capability grew or
    learned (a hybrid-attention allocation or its gates, SGT loops, ...) lives in its callback's
    state (``common["callbacks"]``, as :meth:`CheckpointManager.load` returns it). This loads those
    states and wires the callbacks to the chunks exactly as a resumed run does, for evaluation and
    extraction. The callbacks are not stepped (an elastic model runs its full network). Returns
    ``{capability name: callback}`` (their state is readable).
    """
    callbacks = capability_callbacks(cfg, log=lambda *args: None)
    ctx = TrainContext(config=cfg, model=list(model_chunks), optimizer=None, run_dir=Path(run_dir),
                       pg_collection=process_groups(), step=common.get("step", 0),
                       consumed_samples=common.get("consumed_samples", 0))
    states = common.get("callbacks") or {}
    for cb in callbacks.values():
        cb.load_state_dict(states.get(cb.name, {}))
        cb.on_train_start(ctx)
    return callbacks
