"""The enabled capabilities' callbacks and batch hooks, and restoring their structure after a load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List

from megatron_ext.capability import BatchHook, Callback, TrainContext
from megatron_ext.parallel.state import process_groups
from megatron_ext.run import RunConfig
from megatron_ext.run.schedule import RunSchedule
from megatron_ext.training.checkpoint import CommonState


def capability_callbacks(cfg: RunConfig, log: Callable = print) -> Dict[str, Callback]:
    """``{capability name: callback}`` of the enabled capabilities that have per-step logic, in
    registry order."""
    tokens = consumed_tokens(cfg)
    callbacks = {capability.name: capability.callback(cfg, log, tokens) for capability in cfg.capabilities}
    return {name: cb for name, cb in callbacks.items() if cb is not None}


def consumed_tokens(cfg: RunConfig) -> Callable[[int], int]:
    """Training tokens after each optimizer step as the run draws them (a batch-size ramp-up, the
    stages' sequence lengths); past the run's last step, as many per step as its last. The global batch
    of a step does not depend on the layout, so one data-parallel rank counts them. The schedule is
    computed on the first call (most runs' callbacks never ask)."""
    last, computed = cfg.train.steps, []

    def after(step: int) -> int:
        if not computed:
            computed.append(RunSchedule(cfg, data_parallel=1))
        schedule = computed[0]
        per_step_after = schedule.consumed_tokens(last) - schedule.consumed_tokens(last - 1)
        return schedule.consumed_tokens(min(step, last)) + max(0, step - last) * per_step_after

    return after


def batch_hooks(cfg: RunConfig) -> List[BatchHook]:
    """What the forward step calls before each micro-batch's forward, in registry order."""
    hooks = [capability.batch_hook(cfg) for capability in cfg.capabilities]
    return [hook for hook in hooks if hook is not None]


def restore_capabilities(cfg: RunConfig, model_chunks: list, common: CommonState, run_dir: Path) -> Dict[str, Callback]:
    """Give model chunks loaded from a checkpoint the structure training left them in.

    A checkpoint's weights alone are not the trained model: the structure a capability grew or
    learned (a hybrid-attention allocation or its gates, SGT loops, ...) lives in its callback's
    state (``common.callbacks``, as :meth:`CheckpointManager.load` returns it). This loads those
    states and wires the callbacks to the chunks exactly as a resumed run does, for evaluation and
    extraction. The callbacks are not stepped (an elastic model runs its full network). Returns
    ``{capability name: callback}`` (their state is readable).
    """
    callbacks = capability_callbacks(cfg, log=lambda *args: None)
    ctx = TrainContext(
        config=cfg,
        model=list(model_chunks),
        optimizer=None,
        run_dir=Path(run_dir),
        pg_collection=process_groups(),
        step=common.step,
        consumed_samples=common.consumed_samples,
    )
    for cb in callbacks.values():
        cb.load_state_dict(common.callback_state(cb))
        cb.on_train_start(ctx)
    return callbacks


def checked_metrics(callback: Callback, metrics: Dict[str, Any], record: Dict[str, Any]) -> Dict[str, Any]:
    """``metrics`` of ``callback``, refused when a key is outside its declared prefixes or already in the
    step's ``record`` (a callback must not overwrite ``loss`` or another method's metric)."""
    stray = [key for key in metrics if not key.startswith(callback.metric_prefixes) or key in record]
    if stray:
        raise RuntimeError(
            f"callback {callback.name!r} returned metrics {stray} outside its prefixes "
            f"{list(callback.metric_prefixes)} or already logged this step: give each key one of "
            "its callback's metric_prefixes"
        )
    return metrics
