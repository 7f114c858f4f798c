"""The ``looping`` section of the run config: SGT (arXiv 2603.23998) or the whole-block baseline,
and its growth schedule."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import List, Literal

from megatron_ext.config import Checks, ConfigError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(kw_only=True)
class GrowthConfig:
    """SGT growth schedule; defaults are the paper's released configuration [code]."""

    first_selection_step: int = 250
    """Optimizer step (1-based) at which the first layer is selected; entropy EMAs warm up before."""
    window: int = 250
    """Steps between growth decisions, and the length of a selected layer's head fade."""
    top_k_layers: int = 3
    """Size of the highest-entropy layer set that candidates are drawn from."""
    max_selected_layers: int = 3
    """Most layers that ever loop."""
    max_loop_depth: int = 1
    """Most extra attention passes of one layer (1: the layer's attention runs twice)."""
    num_keep_heads: int = 2
    """Heads kept in a selected layer's loop; the others fade out over one window."""
    exclude_layers: List[int] = field(default_factory=lambda: [0])
    """Layers never selected (global indices); the first layer by default."""
    deepen: Literal["any_selected", "latest"] = "any_selected"
    """At a window end, which selected layer may loop once more: ``any_selected`` [code] the first
    selected layer, in selection order, that is in the top-k and below ``max_loop_depth`` (so a
    deeper layer selected earlier can deepen after a shallower one was selected); ``latest``
    [choice] only the most recently selected layer. The two agree at ``max_loop_depth: 1``."""
    decay_type: Literal["linear", "cosine", "exponential"] = "linear"
    """Shape of the fade of a selected layer's other heads over one window: ``linear`` 1 - p,
    ``cosine`` (1 + cos(pi p)) / 2 or ``exponential`` exp(-p ln 1e8) (from 1 to 1e-8, then 0), p the
    fraction of the window elapsed [code]."""
    growth: Literal["deep_to_shallow", "shallow_to_deep"] = "deep_to_shallow"
    """Order in which layers are selected: ``deep_to_shallow`` (SGT) starts from the deepest top-k
    layer and each later selection lies shallower than every selected one; ``shallow_to_deep`` (the
    paper's Table 2 ablation, [choice] its mirror image) starts from the shallowest and grows deeper."""
    head_selection: Literal["high_entropy", "low_entropy"] = "high_entropy"
    """Which heads of a selected layer keep looping: the ``num_keep_heads`` of highest EMA entropy
    (SGT) or of lowest (the paper's Table 2 ablation)."""

    def __post_init__(self) -> None:
        c = Checks(self)
        for name in (
            "first_selection_step",
            "window",
            "top_k_layers",
            "max_selected_layers",
            "max_loop_depth",
            "num_keep_heads",
        ):
            value = getattr(self, name)
            c.require(_is_int(value) and value >= 1, f"{name}={value!r} is not allowed: it must be an int >= 1")
        c.one_of("deepen", ("any_selected", "latest"))
        c.one_of("decay_type", ("linear", "cosine", "exponential"))
        c.one_of("growth", ("deep_to_shallow", "shallow_to_deep"))
        c.one_of("head_selection", ("high_entropy", "low_entropy"))
        excluded = self.exclude_layers
        c.require(
            isinstance(excluded, (list, tuple)) and all(_is_int(v) and v >= 0 for v in excluded),
            f"exclude_layers={excluded!r} is not allowed: it must be a list of layer indices >= 0",
        )
        c.done()
        self.exclude_layers = sorted(set(excluded))

    def problems_with_model(self, num_layers: int, num_heads: int) -> List[str]:
        """Problems that need the model's shape; empty when none."""
        problems = []
        if self.num_keep_heads > num_heads:
            problems.append(
                f"num_keep_heads={self.num_keep_heads} is not allowed: at most the "
                f"{num_heads} attention heads of a layer"
            )
        out_of_range = [layer for layer in self.exclude_layers if layer >= num_layers]
        if out_of_range:
            problems.append(
                f"exclude_layers={self.exclude_layers} is not allowed: {out_of_range} "
                f"not below model.num_layers={num_layers}"
            )
        if self.top_k_layers > num_layers:
            problems.append(
                f"top_k_layers={self.top_k_layers} is not allowed: at most the model's {num_layers} "
                "layers (model.num_layers)"
            )
        candidates = num_layers - len(set(self.exclude_layers) & set(range(num_layers)))
        if candidates < 1:
            problems.append(
                f"exclude_layers={self.exclude_layers} excludes every one of the "
                f"{num_layers} layers: leave at least one layer selectable"
            )
        return problems


@dataclass(kw_only=True)
class LoopingConfig(GrowthConfig):
    """Training-time looping of selected layers, grown deep to shallow (SGT, arXiv 2603.23998).

    The schedule's fields (first_selection_step, window, top_k_layers, max_selected_layers,
    max_loop_depth, num_keep_heads, exclude_layers) are :class:`GrowthConfig`'s, kept flat in YAML;
    defaults are the released configuration of the paper's 300M model [code].
    """

    enabled: bool = False
    """Build looped layers and grow loops during training."""
    method: Literal["sgt", "block"] = "sgt"
    """``sgt``: a selected layer re-applies its attention sublayer ([choice] kept heads only, once the
    others faded out) before its MLP. ``block``: the baseline that re-runs the whole block (attention +
    MLP) of a selected layer. Both use the same entropy-driven schedule; ``block`` ignores
    num_keep_heads."""
    ema_decay: float = 0.5
    """Decay of the per-head entropy EMA across steps, in [0, 1); 0.5 [code]."""
    compute_entropy_after_fixed: bool = False
    """Keep measuring entropy (and logging ``sgt/entropy/*``) after the structure froze [code];
    False stops as soon as no measurement can change the schedule (no cost left)."""

    def __post_init__(self) -> None:
        problems = []
        try:
            super().__post_init__()
        except ConfigError as err:
            problems += err.problems
        c = Checks(self)
        c.one_of("enabled", (True, False))
        c.one_of("method", ("sgt", "block"))
        c.one_of("compute_entropy_after_fixed", (True, False))
        c.within("ema_decay", 0.0, 1.0, high_open=True)
        if problems or c.problems:
            raise ConfigError(problems + c.problems)
        self.ema_decay = float(self.ema_decay)

    def growth_config(self) -> GrowthConfig:
        """The schedule's parameters as the :class:`GrowthScheduler` takes them."""
        return GrowthConfig(**{f.name: copy.copy(getattr(self, f.name)) for f in fields(GrowthConfig)})
