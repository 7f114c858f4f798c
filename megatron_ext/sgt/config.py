"""The ``looping`` section of the run config: SGT (or the whole-block baseline) and its schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal

from megatron_ext.sgt.scheduler import GrowthConfig

_POSITIVE_INTS = ("first_selection_step", "window", "top_k_layers", "max_selected_layers", "max_loop_depth",
                  "num_keep_heads")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class LoopingConfig:
    """Training-time looping of selected layers, grown deep to shallow (SGT, arXiv 2603.23998).

    Defaults are the released configuration of the paper's 300M model.
    """

    enabled: bool = False
    """Build looped layers and grow loops during training."""
    method: Literal["sgt", "block"] = "sgt"
    """``sgt``: a selected layer re-applies its attention sublayer (kept heads only, once the others
    faded out) before its MLP. ``block``: the baseline that re-runs the whole block (attention +
    MLP) of a selected layer. Both use the same entropy-driven schedule."""
    first_selection_step: int = 250
    """Optimizer step (1-based) of the first layer selection; entropy EMAs warm up before it."""
    window: int = 250
    """Steps between growth decisions, and the length of a selected layer's head fade."""
    top_k_layers: int = 3
    """Size of the highest-entropy layer set that candidates are drawn from."""
    max_selected_layers: int = 3
    """Most layers that ever loop."""
    max_loop_depth: int = 1
    """Most extra passes of one layer (1: its attention, or block, runs twice)."""
    num_keep_heads: int = 2
    """Heads (of all query heads of a layer) that keep looping; the others fade out over one window.
    Ignored by ``block``, which re-runs every head."""
    exclude_layers: List[int] = field(default_factory=lambda: [0])
    """Global layer indices that are never selected; the first layer by default."""
    ema_decay: float = 0.5
    """Decay of the per-head entropy EMA across steps, in [0, 1)."""

    def __post_init__(self) -> None:
        problems: List[str] = []
        if not isinstance(self.enabled, bool):
            problems.append(f"looping.enabled={self.enabled!r} is not allowed: use true or false")
        if self.method not in ("sgt", "block"):
            problems.append(f"looping.method={self.method!r} is not allowed: use 'sgt' or 'block'")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                problems.append(f"looping.{name}={value!r} is not allowed: it must be an int >= 1")
        excluded = self.exclude_layers
        if not isinstance(excluded, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in excluded):
            problems.append(f"looping.exclude_layers={excluded!r} is not allowed: it must be a list of "
                            "layer indices >= 0")
        decay = self.ema_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            problems.append(f"looping.ema_decay={decay!r} is not allowed: it must be a number in [0, 1)")
        if problems:
            # Imported here: the run config's schema imports this module, and importing
            # megatron_ext.config.loader at the top would run that schema first (an import cycle).
            from megatron_ext.config.loader import ConfigError

            raise ConfigError(problems)
        self.exclude_layers = sorted(set(excluded))
        self.ema_decay = float(decay)

    def growth_config(self) -> GrowthConfig:
        """The schedule's parameters as the :class:`GrowthScheduler` takes them."""
        return GrowthConfig(
            first_selection_step=self.first_selection_step,
            window=self.window,
            top_k_layers=self.top_k_layers,
            max_selected_layers=self.max_selected_layers,
            max_loop_depth=self.max_loop_depth,
            num_keep_heads=self.num_keep_heads,
            exclude_layers=list(self.exclude_layers),
        )

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
