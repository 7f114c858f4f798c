"""The interface through which capabilities add per-step logic to the training loop.

Constraint updates, expert-bias updates, sub-network sampling and growth steps are callbacks;
the loop calls every callback at the same points and checkpoints their state, so it never
branches on which capabilities are on. A callback's metrics go to ``metrics.jsonl`` under the
keys it returns (prefixed by its capability, e.g. ``moe/load_cv``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple


@dataclass(kw_only=True)
class TrainContext:
    """What callbacks may read (and, for the model, act on) during training."""

    config: Any
    """The RunConfig."""
    model: List[Any]
    """DDP-wrapped model chunks of this rank."""
    optimizer: Any
    run_dir: Path
    pg_collection: Any
    """Megatron's ``ProcessGroupCollection`` of this rank (tp, pp, mp, dp, dp_cp, ep, ...): callbacks
    reduce over these groups instead of reading Megatron's global parallel state."""
    step: int = 0
    """Optimizer steps completed so far."""
    consumed_samples: int = 0
    """Training samples drawn so far."""
    num_microbatches: int = 1
    """Micro-batches of this rank in the step in progress (its global batch, which a ramp-up or a stage
    changes, over micro-batch size x data-parallel size); set before ``on_step_begin``."""
    evaluate: Optional[Callable[[], float]] = None
    """Validation loss of the model as it is now: the periodic evaluation's batches and forward
    (``train.eval_steps`` global batches, eval mode, no gradients). A collective: every rank calls it
    at the same point. None outside the training loop."""


class Callback:
    """Base class: every hook is optional."""

    name: str = "callback"
    """Keys the callback's state in checkpoints; a capability's callback has the capability's name (one
    name per method: its config section, registry entry and checkpoint state)."""
    state_aliases: Tuple[str, ...] = ()
    """Names the callback's state had in older checkpoints (read when ``name`` is absent)."""
    metric_prefixes: Tuple[str, ...] = ()
    """The prefixes of the metrics :meth:`on_step_end` returns (e.g. ``("moe/", "elastic/")``); the loop
    refuses any other key, so that no callback can overwrite a core metric such as ``loss``."""

    def on_train_start(self, ctx: TrainContext) -> None:
        """After the model, optimizer and any checkpoint are loaded, before the first step."""

    def on_step_begin(self, ctx: TrainContext) -> None:
        """Before the forward/backward of step ``ctx.step + 1`` (e.g. sample a sub-network)."""

    def adjust_cost(self, ctx: TrainContext, cost) -> None:
        """Change the :class:`~megatron_ext.models.flops.ModelCost` of step ``ctx.step``, which has
        just run (before :meth:`on_step_end`), by what this capability computed differently from the
        dense full-attention model: the ``model_flops_per_token`` / ``mfu`` metrics. No collectives."""

    def on_step_end(self, ctx: TrainContext, result) -> Dict[str, float]:
        """After the optimizer update of step ``ctx.step``; return metrics to log."""
        return {}

    def on_train_end(self, ctx: TrainContext) -> None:
        """After the last step and the final checkpoint."""

    def state_dict(self) -> Dict[str, Any]:
        """State to checkpoint (identical on all ranks)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
