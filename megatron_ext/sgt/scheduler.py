"""SGT growth schedule: which layers loop, how deep, and which of their heads stay.

SGT (Sparse Growing Transformer, arXiv 2603.23998) starts from a plain transformer and,
during training, grows extra attention passes ("loops") on a few informative layers, from deep to
shallow. Informativeness is the EMA of the last query's normalized attention entropy
(:mod:`megatron_ext.sgt.entropy`); a layer's score is the mean over its heads.

Schedule [code] (``window`` steps per phase; step numbers are 1-based and counted after the step):

1. At ``first_selection_step``: rank the non-excluded layers by score, take the ``top_k_layers``
   best and select the deepest of them (largest index). It loops once (depth 1) and a window
   opens.
2. When a window ends (``window`` steps after it opened), with the current top-k:

   * a selected layer still in the top-k and below ``max_loop_depth`` loops once more, and a new
     window opens: the first such layer in selection order [code] (``deepen: any_selected``), or
     only the most recently selected one (``deepen: latest``, [choice]);
   * else, fewer than ``max_selected_layers`` layers are selected and a top-k layer lies
     shallower than every selected layer: the deepest such layer is selected (depth 1), and a
     new window opens;
   * else the structure freezes for good: no more events, and entropy is no longer needed.

3. A selected layer keeps the ``num_keep_heads`` heads of highest EMA entropy at its selection.
   Its other heads' loop outputs are multiplied by a fade from 1 to 0 over one window (linear
   ``1 - p``, cosine or exponential, ``decay_type``), ``p = (step - 1 - s) / window``, ``s`` the layer's
   selection step [code]: the reference updates the factors when a step ends, for the next
   step's forward, so the first looped step runs at 1 and the factors reach 0 at step
   ``s + window + 1``. After that ([choice]) the other heads are not computed.

The paper's ablations (Table 2) are switches of the same schedule: ``growth: shallow_to_deep``
selects the shallowest top-k layer first and then only layers deeper than every selected one (the
mirror image of steps 1 and 2, ties to the shallower layer), ``head_selection: low_entropy`` keeps
the heads of lowest EMA entropy.

Reference code: ``olmo/dynamic_layer_scheduler.py`` and ``olmo/loop_attention.py``
(``select_heads``, ``update_head_decay``) of the authors' repository
(YaoChen0203/Sparse-Growing-Transformer), with the released configuration's values as defaults
(``configs/OLMo-300M-...-LoopDepth_1-NumHead_2-EmaDecay_0.5_DecayWindow_250-...yaml``).
Where that code leaves room, this module decides as follows:

* [code] Deepening, by default, takes the first selected layer in selection order that is still in
  the top-k and below ``max_loop_depth``, as the reference; ``deepen: latest`` [choice] restricts it
  to the most recently selected layer. With the released ``max_loop_depth = 1`` no layer is ever
  deepened and the two rules agree.
* [choice] Ranking ties (equal scores) go to the larger layer index (deeper first), matching the
  deep-to-shallow growth; the reference's stable ``sorted`` keeps its dict order on ties
  (shallower first). Head ties go to the lower head index (the reference's unstable
  ``torch.sort`` leaves them unspecified).
* [choice] The first selection happens at the first ``step`` call with
  ``step >= first_selection_step`` and a window is evaluated at the first call with
  ``step >= window end`` (the reference tests ``==`` for the first selection, which never fires
  if that step is skipped, e.g. by resuming past it).
* [choice] The freeze is an event at the window end where it is decided, as in the reference.
  If the first selection finds no candidate (every scored layer excluded) the structure freezes
  at once; the reference then idles forever in its "selecting" phase.
* [choice] ``tracking_needed`` turns False as soon as no entropy value can change the remaining
  schedule: once frozen, and already during the last window, when ``max_selected_layers`` layers
  are selected and every layer that could deepen is at ``max_loop_depth`` (the reference keeps
  measuring until the freeze).
* [code] Deepening does not restart the head fade, as in the reference (``increase_loop_depth`` leaves
  the decay window alone): the fade always runs from the layer's selection step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Literal, Mapping, Optional, Tuple

import torch

from megatron_ext.sgt.config import GrowthConfig

__all__ = ["Event", "GrowthConfig", "GrowthScheduler"]

EXPONENTIAL_DECAY_RATE = -math.log(1e-8)
"""``decay_type: exponential`` fades as ``exp(-k p)`` with ``k = ln 1e8``: 1e-8 at the window's end [code]."""


@dataclass(frozen=True)
class Event:
    """One change of the looped structure, as returned by :meth:`GrowthScheduler.step`."""

    kind: Literal["select", "deepen", "freeze"]
    """``select``: a new layer loops; ``deepen``: a selected layer loops once more; ``freeze``:
    the structure is final."""
    step: int
    """Step at which it happened."""
    layer: Optional[int] = None
    """Layer selected or deepened; None for ``freeze``."""
    depth: int = 0
    """The layer's loop depth after the event; 0 for ``freeze``."""
    kept_heads: Tuple[int, ...] = ()
    """The layer's kept heads, highest entropy first; empty for ``freeze``."""


class GrowthScheduler:
    """Drives the SGT schedule described in the module docstring.

    Call :meth:`step` once per optimizer step, after the entropy EMAs were updated for that step,
    with the step number and the current scores; it returns the events of that step. The loop
    structure to run at step ``t`` is :attr:`loop_depths` and :meth:`head_factors` (``t``).
    """

    def __init__(self, config: GrowthConfig, num_layers: int, num_heads: int):
        if num_layers < 1 or num_heads < 1:
            raise ValueError(f"num_layers={num_layers} and num_heads={num_heads} must be positive")
        problems = config.problems_with_model(num_layers, num_heads)
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.num_layers = num_layers
        self.num_heads = num_heads
        self._selected: List[int] = []
        self._depth: Dict[int, int] = {}
        self._kept: Dict[int, Tuple[int, ...]] = {}
        self._selected_at: Dict[int, int] = {}
        self._window_end: Optional[int] = None  # None: no window open (before the first selection, frozen)
        self._frozen = False

    # -- schedule ---------------------------------------------------------------------------

    def step(
        self, step: int, layer_scores: Mapping[int, float], head_entropy: Mapping[int, torch.Tensor]
    ) -> List[Event]:
        """Advance to ``step`` (1-based, after it completed) and return the events taken there.

        Args:
            step: the optimizer step just completed.
            layer_scores: ``{layer: score}``, the mean EMA head entropy; layers absent from it are
                not candidates. Read only at decision steps.
            head_entropy: ``{layer: [num_heads] EMA entropy}``; read only for a layer being
                selected, to choose its kept heads.
        """
        if self._frozen:
            return []
        if not self._selected:
            if step < self.config.first_selection_step:
                return []
            top_k = self._top_k(layer_scores)
            if not top_k:
                return [self._freeze(step)]
            return [self._select(self._first_in_growth_order(top_k), step, head_entropy)]
        if step < self._window_end:
            return []
        top_k = self._top_k(layer_scores)
        for layer in self._deepening_candidates():
            if layer in top_k and self._depth[layer] < self.config.max_loop_depth:
                self._depth[layer] += 1
                self._window_end = step + self.config.window
                return [Event("deepen", step, layer, self._depth[layer], self._kept[layer])]
        if len(self._selected) < self.config.max_selected_layers:
            candidates = [layer for layer in top_k if self._beyond_selected(layer)]
            if candidates:
                return [self._select(self._first_in_growth_order(candidates), step, head_entropy)]
        return [self._freeze(step)]

    @property
    def _deep_first(self) -> bool:
        return self.config.growth == "deep_to_shallow"

    def _first_in_growth_order(self, layers: List[int]) -> int:
        """The deepest of ``layers`` (deep to shallow growth), or the shallowest (shallow to deep)."""
        return max(layers) if self._deep_first else min(layers)

    def _beyond_selected(self, layer: int) -> bool:
        """Whether ``layer`` lies further along the growth direction than every selected layer."""
        return layer < min(self._selected) if self._deep_first else layer > max(self._selected)

    def _deepening_candidates(self) -> List[int]:
        return list(self._selected) if self.config.deepen == "any_selected" else self._selected[-1:]

    def _top_k(self, layer_scores: Mapping[int, float]) -> List[int]:
        """The ``top_k_layers`` best non-excluded layers, by score; ties go to the layer met first in the
        growth direction (the deeper one for deep to shallow, [choice])."""
        for layer, score in layer_scores.items():
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"layer_scores has layer {layer}, outside [0, {self.num_layers})")
            if not math.isfinite(score):
                raise ValueError(f"layer {layer} has a non-finite score {score}: its entropy EMA is broken")
        excluded = set(self.config.exclude_layers)
        direction = 1 if self._deep_first else -1
        ranked = sorted(
            (layer for layer in layer_scores if layer not in excluded),
            key=lambda layer: (layer_scores[layer], direction * layer),
            reverse=True,
        )
        return ranked[: self.config.top_k_layers]

    def _select(self, layer: int, step: int, head_entropy: Mapping[int, torch.Tensor]) -> Event:
        if layer not in head_entropy:
            raise KeyError(f"head_entropy has no entry for layer {layer}, which is being selected")
        entropy = torch.as_tensor(head_entropy[layer]).detach().to("cpu", torch.float64)
        if tuple(entropy.shape) != (self.num_heads,):
            raise ValueError(f"head_entropy[{layer}] has shape {tuple(entropy.shape)}, expected ({self.num_heads},)")
        # Stable sort (of the negated values for the highest): ties go to the lower head index.
        sign = -1.0 if self.config.head_selection == "high_entropy" else 1.0
        order = torch.sort(sign * entropy, stable=True).indices
        kept = tuple(int(head) for head in order[: self.config.num_keep_heads])
        self._selected.append(layer)
        self._depth[layer] = 1
        self._kept[layer] = kept
        self._selected_at[layer] = step
        self._window_end = step + self.config.window
        return Event("select", step, layer, 1, kept)

    def _freeze(self, step: int) -> Event:
        self._frozen = True
        self._window_end = None
        return Event("freeze", step)

    # -- structure --------------------------------------------------------------------------

    @property
    def loop_depths(self) -> Dict[int, int]:
        """``{layer: extra attention passes}`` of the selected layers."""
        return dict(self._depth)

    @property
    def selected_layers(self) -> List[int]:
        """Selected layers in selection order (deep to shallow)."""
        return list(self._selected)

    @property
    def frozen(self) -> bool:
        """True once the structure is final."""
        return self._frozen

    @property
    def tracking_needed(self) -> bool:
        """Whether entropy still has to be measured: False once no measurement can change the
        schedule (frozen, or [choice] in the last window when only a freeze can follow)."""
        if self._frozen:
            return False
        if len(self._selected) < self.config.max_selected_layers:
            return True
        return any(self._depth[layer] < self.config.max_loop_depth for layer in self._deepening_candidates())

    def kept_heads(self, layer: int) -> Tuple[int, ...]:
        """Heads of ``layer`` that keep looping, highest entropy at selection first."""
        self._check_selected(layer)
        return self._kept[layer]

    def head_factors(self, layer: int, step: int) -> List[float]:
        """Per-head multiplier of ``layer``'s loop output at ``step``.

        1.0 for kept heads; for the others the fade at ``p = (step - 1 - s) / window`` clamped to
        [0, 1] [code], ``s`` the layer's selection step: ``1 - p`` (linear), ``(1 + cos(pi p)) / 2``
        (cosine) or ``exp(-p ln 1e8)`` (exponential); 0 from ``p = 1`` on.
        """
        self._check_selected(layer)
        progress = min(1.0, max(0.0, (step - 1 - self._selected_at[layer]) / self.config.window))
        if progress >= 1.0:
            fade = 0.0
        elif self.config.decay_type == "cosine":
            fade = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.config.decay_type == "exponential":
            fade = math.exp(-EXPONENTIAL_DECAY_RATE * progress)
        else:
            fade = 1.0 - progress
        kept = set(self._kept[layer])
        return [1.0 if head in kept else fade for head in range(self.num_heads)]

    def active_heads(self, layer: int, step: int) -> Tuple[int, ...]:
        """Heads of ``layer`` whose loop output is nonzero at ``step``: the only ones to compute [choice]."""
        return tuple(head for head, factor in enumerate(self.head_factors(layer, step)) if factor > 0.0)

    def _check_selected(self, layer: int) -> None:
        if layer not in self._depth:
            raise KeyError(f"layer {layer} is not selected (selected: {self._selected})")

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain-Python state (ints, lists, dicts), safe for ``torch.save`` and YAML/JSON."""
        return {
            "selected": list(self._selected),
            "depth": dict(self._depth),
            "kept": {layer: list(heads) for layer, heads in self._kept.items()},
            "selected_at": dict(self._selected_at),
            "window_end": self._window_end,
            "frozen": self._frozen,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (layer keys may have become strings, as in JSON)."""
        selected = [int(layer) for layer in state["selected"]]
        if any(not 0 <= layer < self.num_layers for layer in selected):
            raise ValueError(f"checkpoint selects layers {selected}, not all below num_layers={self.num_layers}")
        self._selected = selected
        self._depth = {int(layer): int(depth) for layer, depth in state["depth"].items()}
        self._kept = {int(layer): tuple(int(h) for h in heads) for layer, heads in state["kept"].items()}
        self._selected_at = {int(layer): int(step) for layer, step in state["selected_at"].items()}
        self._window_end = None if state["window_end"] is None else int(state["window_end"])
        self._frozen = bool(state["frozen"])
