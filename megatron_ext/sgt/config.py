"""The ``looping`` section of the run config: SGT (or the whole-block baseline) and its schedule."""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import List, Literal

from megatron_ext.sgt.scheduler import GrowthConfig

@dataclass
class LoopingConfig(GrowthConfig):
    """Training-time looping of selected layers, grown deep to shallow (SGT, arXiv 2603.23998).

    The schedule's fields (first_selection_step, window, top_k_layers, max_selected_layers,
    max_loop_depth, num_keep_heads, exclude_layers) are :class:`GrowthConfig`'s, kept flat in YAML;
    defaults are the released configuration of the paper's 300M model.
    """

    enabled: bool = False
    """Build looped layers and grow loops during training."""
    method: Literal["sgt", "block"] = "sgt"
    """``sgt``: a selected layer re-applies its attention sublayer (kept heads only, once the others
    faded out) before its MLP. ``block``: the baseline that re-runs the whole block (attention +
    MLP) of a selected layer. Both use the same entropy-driven schedule; ``block`` ignores
    num_keep_heads."""
    ema_decay: float = 0.5
    """Decay of the per-head entropy EMA across steps, in [0, 1)."""

    def __post_init__(self) -> None:
        # Imported here: the run config's schema imports this module, and importing
        # megatron_ext.config.loader at the top would run that schema first (an import cycle).
        from megatron_ext.config.loader import ConfigError

        problems: List[str] = []
        try:
            super().__post_init__()
        except ConfigError as err:
            problems += [f"looping.{p}" for p in err.problems]
        if not isinstance(self.enabled, bool):
            problems.append(f"looping.enabled={self.enabled!r} is not allowed: use true or false")
        if self.method not in ("sgt", "block"):
            problems.append(f"looping.method={self.method!r} is not allowed: use 'sgt' or 'block'")
        decay = self.ema_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            problems.append(f"looping.ema_decay={decay!r} is not allowed: it must be a number in [0, 1)")
        if problems:
            raise ConfigError(problems)
        self.ema_decay = float(decay)

    def growth_config(self) -> GrowthConfig:
        """The schedule's parameters as the :class:`GrowthScheduler` takes them."""
        return GrowthConfig(**{f.name: copy.copy(getattr(self, f.name)) for f in fields(GrowthConfig)})

    def problems_with_model(self, num_layers: int, num_attention_heads: int) -> List[str]:
        """Problems that need the model's shape (for the cross-section checks); empty when none."""
        problems = []
        if self.num_keep_heads > num_attention_heads:
            problems.append(f"looping.num_keep_heads={self.num_keep_heads} is not allowed: at most the "
                            f"{num_attention_heads} attention heads of a layer")
        out_of_range = [layer for layer in self.exclude_layers if layer >= num_layers]
        if out_of_range:
            problems.append(f"looping.exclude_layers={self.exclude_layers} is not allowed: {out_of_range} "
                            f"not below model.num_layers={num_layers}")
        candidates = num_layers - len(set(self.exclude_layers) & set(range(num_layers)))
        if candidates < 1:
            problems.append(f"looping.exclude_layers={self.exclude_layers} excludes every one of the "
                            f"{num_layers} layers: leave at least one layer selectable")
        return problems
