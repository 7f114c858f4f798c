"""SGT in the training loop: measure head entropy, grow loops on schedule, report, checkpoint.

Per optimizer step, on every rank:

1. ``on_step_begin``: each looped layer gets its loop depth and head factors for the step.
2. During forward, every :class:`LoopedTransformerLayer` of this rank hands its local heads'
   last-query entropy (mean over the micro-batch) to this callback, once per micro-batch.
3. ``on_step_end``: the step's per-layer means over micro-batches are assembled into one
   ``[num_layers, num_heads]`` matrix that every rank holds: each rank writes its layers (pipeline
   stage) and its heads (tensor-parallel slice), zeros elsewhere, and the matrix is summed over the
   tensor- and the pipeline-parallel group. :class:`EntropyTracker` averages it over the
   data-parallel group and folds it into the EMA; :class:`GrowthScheduler` then takes its
   decisions, identically on every rank, and the local looped layers follow them. Once no
   measurement can change the schedule, the entropy hooks are removed (no cost left).

Metrics (of the step just run): ``sgt/looped_layers``, ``sgt/loop_depths`` (one int per layer),
``sgt/flops_overhead`` (analytical training FLOPs relative to the vanilla model,
:mod:`megatron_ext.sgt.flops`) and ``sgt/entropy/<layer>`` (the layer's EMA score). At the end of
training rank 0 writes ``plots/sgt_entropy.png``: the layer scores over the steps, one line per
layer, and a vertical line in the layer's colour at each selection or deepening (grey: freeze).
"""

from __future__ import annotations

import math
import struct
import zlib
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_ext.sgt.config import LoopingConfig
from megatron_ext.sgt.entropy import EntropyTracker
from megatron_ext.sgt.flops import GPTShape, LoopedLayer, LoopStructure, flops_overhead
from megatron_ext.sgt.looped_layer import LoopedTransformerLayer
from megatron_ext.sgt.scheduler import Event, GrowthScheduler
from megatron_ext.training.callbacks import Callback, TrainContext

__all__ = ["SGTCallback"]


class SGTCallback(Callback):
    """Drives SGT (or the block-loop baseline) over the :class:`LoopedTransformerLayer`s of a model.

    Args:
        config: the ``looping`` section.
        num_layers: decoder layers of the whole model.
        num_heads: query heads per layer.
        num_kv_heads: KV heads per layer (for the FLOPs of a loop); None means ``num_heads``.
        flops_shape: the model shape for ``sgt/flops_overhead``; None derives it from the
            ``RunConfig`` at the start of training.
        log: where rank 0 reports growth events.
    """

    name = "sgt"

    def __init__(self, config: LoopingConfig, num_layers: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 flops_shape: Optional[GPTShape] = None, log: Callable[[str], None] = print):
        self.config = config
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.flops_shape = flops_shape
        self.log = log
        self.scheduler = GrowthScheduler(config.growth_config(), num_layers, num_heads)
        self.tracker = EntropyTracker(range(num_layers), num_heads, decay=config.ema_decay)
        self.layers: Dict[int, LoopedTransformerLayer] = {}
        self.history: List[list] = []
        """``[step, [score per layer (nan: not observed yet)]]`` for every tracked step."""
        self.events: List[dict] = []
        """Growth events so far, as plain dicts (checkpoint-safe)."""
        self._sums: Dict[int, torch.Tensor] = {}
        self._counts: Dict[int, int] = {}
        self._tracking = False
        self._step_metrics: Dict[str, object] = {}
        self._tp_group = self._pp_group = self._dp_group = None

    # -- wiring ------------------------------------------------------------------------------

    def on_train_start(self, ctx: TrainContext) -> None:
        from megatron.core import parallel_state

        self.layers = {module.layer_index: module for chunk in ctx.model for module in chunk.modules()
                       if isinstance(module, LoopedTransformerLayer)}
        if not self.layers:
            raise RuntimeError("looping is enabled but the model has no LoopedTransformerLayer: build its "
                               "layer specs with megatron_ext.sgt.looped_layer.looped_layer_spec")
        heads = {layer.num_heads for layer in self.layers.values()}
        if heads != {self.num_heads}:
            raise ValueError(f"SGTCallback was built for {self.num_heads} heads per layer; the model's looped "
                             f"layers have {sorted(heads)}")
        self._tp_group = parallel_state.get_tensor_model_parallel_group()
        self._pp_group = parallel_state.get_pipeline_model_parallel_group()
        self._dp_group = parallel_state.get_data_parallel_group()
        if self.flops_shape is None:
            from megatron_ext.models.builder import padded_vocab_size

            self.flops_shape = GPTShape.from_run_config(ctx.config, padded_vocab_size(ctx.config.model.vocab_size))
        self._apply_structure(ctx.step + 1)  # after a resume: the loaded schedule's structure
        self._set_tracking(self.scheduler.tracking_needed)

    def _set_tracking(self, on: bool) -> None:
        for index, layer in self.layers.items():
            layer.set_entropy_sink(partial(self._observe, index) if on else None)
        self._tracking = on

    def _observe(self, layer: int, entropy: torch.Tensor) -> None:
        """Entropy sink of ``layer``: one micro-batch's ``[local heads]`` mean over the batch."""
        if layer in self._sums:
            self._sums[layer] += entropy
            self._counts[layer] += 1
        else:
            self._sums[layer] = entropy.detach().clone()
            self._counts[layer] = 1

    def _apply_structure(self, step: int) -> None:
        """Loop depth and head factors of every local looped layer for step ``step``."""
        depths = self.scheduler.loop_depths
        for index, layer in self.layers.items():
            depth = depths.get(index, 0)
            layer.set_loop(depth, self.config.method)
            if depth:
                layer.set_head_factors(self.scheduler.head_factors(index, step))

    # -- per step ----------------------------------------------------------------------------

    def on_step_begin(self, ctx: TrainContext) -> None:
        step = ctx.step + 1
        self._apply_structure(step)
        depths = self.scheduler.loop_depths
        self._step_metrics = {
            "sgt/looped_layers": len(depths),
            "sgt/loop_depths": [depths.get(layer, 0) for layer in range(self.num_layers)],
            "sgt/flops_overhead": flops_overhead(self.flops_shape, self.structure(step)),
        }

    def on_step_end(self, ctx: TrainContext, result) -> Dict[str, object]:
        if self._tracking:
            for layer, entropy in self._gather_step_entropy().items():
                self.tracker.accumulate(layer, entropy)
            self.tracker.end_step(self._dp_group)
            scores = self.tracker.layer_scores()
            self.history.append([ctx.step, [scores.get(layer, math.nan) for layer in range(self.num_layers)]])
        events = self.scheduler.step(ctx.step, self.tracker.layer_scores(), self.tracker.head_emas())
        for event in events:
            self.events.append(_event_to_dict(event))
            if dist.get_rank() == 0:
                self.log(_describe(event, self.config.method))
        self._apply_structure(ctx.step + 1)  # evaluation right after this step runs the new structure
        if self._tracking and not self.scheduler.tracking_needed:
            self._set_tracking(False)
        metrics = dict(self._step_metrics)
        metrics.update({f"sgt/entropy/{layer}": score for layer, score in self.tracker.layer_scores().items()})
        return metrics

    def _gather_step_entropy(self) -> Dict[int, torch.Tensor]:
        """``{layer: [num_heads] mean over this step's micro-batches}``, the same on every rank of
        the model-parallel group (data-parallel averaging is the tracker's)."""
        from megatron_ext.parallel.state import comm_device

        # Last column: 1 where a layer was observed, written by TP rank 0 only, so that the sum
        # over the TP group counts each layer once.
        matrix = torch.zeros(self.num_layers, self.num_heads + 1, dtype=torch.float64, device=comm_device())
        first_tp_rank = dist.get_rank(group=self._tp_group) == 0
        for index, total in self._sums.items():
            heads = self.layers[index].local_head_range
            matrix[index, heads.start:heads.stop] = total.double() / self._counts[index]
            if first_tp_rank:
                matrix[index, -1] = 1.0
        self._sums.clear()
        self._counts.clear()
        for group in (self._tp_group, self._pp_group):
            if dist.get_world_size(group=group) > 1:
                dist.all_reduce(matrix, group=group)
        observed = matrix[:, -1].cpu() > 0.5
        return {int(layer): matrix[layer, :-1] for layer in observed.nonzero().flatten()}

    def structure(self, step: int) -> LoopStructure:
        """What the model computes at ``step``: the kept heads of an SGT layer once its fade is over,
        every head while it runs (the all-heads reference path). With grouped-query attention and a
        core attention that has ``forward_heads``, a loop computes whole KV groups, which this
        count (kept query heads only) does not include."""
        group_size = self.num_heads // self.num_kv_heads
        layers = {}
        for index, depth in self.scheduler.loop_depths.items():
            factors = self.scheduler.head_factors(index, step)
            if all(f in (0.0, 1.0) for f in factors):
                heads = [head for head, factor in enumerate(factors) if factor > 0.0]
                layers[index] = LoopedLayer(depth, len(heads), len({head // group_size for head in heads}))
            else:
                layers[index] = LoopedLayer(depth, self.num_heads, self.num_kv_heads)
        return LoopStructure(self.config.method, layers)

    def on_train_end(self, ctx: TrainContext) -> None:
        if dist.get_rank() == 0 and self.history:
            plots = Path(ctx.run_dir) / "plots"
            plots.mkdir(parents=True, exist_ok=True)
            write_entropy_plot(plots / "sgt_entropy.png", self.history, self.events)

    # -- checkpoint --------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, object]:
        return {
            "tracker": self.tracker.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": [list(entry) for entry in self.history],
            "events": [dict(event) for event in self.events],
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if not state:  # a checkpoint written without looping: start the schedule afresh
            return
        self.tracker.load_state_dict(state["tracker"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = [list(entry) for entry in state["history"]]
        self.events = [dict(event) for event in state["events"]]


def _event_to_dict(event: Event) -> dict:
    return {"kind": event.kind, "step": event.step, "layer": event.layer, "depth": event.depth,
            "kept_heads": list(event.kept_heads)}


def _describe(event: Event, method: str) -> str:
    if event.kind == "freeze":
        return f"sgt: step {event.step}: loop structure frozen"
    what = "select" if event.kind == "select" else "deepen"
    heads = f", kept heads {list(event.kept_heads)}" if method == "sgt" else ""
    return f"sgt: step {event.step}: {what} layer {event.layer} (loop depth {event.depth}{heads})"


# -- plot (numpy + zlib: no plotting dependency) ------------------------------------------------

_GLYPHS = {  # 3 x 5 pixel digits, rows top to bottom, 3 bits per row
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2),
}


def _palette(count: int) -> np.ndarray:
    """``count`` distinct saturated colours (a hue wheel), uint8 ``[count, 3]``."""
    hue = np.arange(count) / max(count, 1) * 6.0
    rgb = np.clip(np.stack([np.abs(hue - 3.0) - 1.0, 2.0 - np.abs(hue - 2.0), 2.0 - np.abs(hue - 4.0)], 1), 0, 1)
    return (rgb * 200).astype(np.uint8)


def _text(canvas: np.ndarray, x: int, y: int, text: str, scale: int = 2) -> None:
    for char in text:
        for row, bits in enumerate(_GLYPHS.get(char, (0,) * 5)):
            for col in range(3):
                if bits >> (2 - col) & 1:
                    canvas[y + row * scale: y + (row + 1) * scale, x + col * scale: x + (col + 1) * scale] = 0
        x += 4 * scale


def write_entropy_plot(path: Path, history: List[list], events: List[dict], width: int = 800,
                       height: int = 420) -> None:
    """PNG of the per-layer entropy scores over steps, with growth events as vertical lines.

    Right: the legend (layer index in its colour); left: the score range; bottom: the step range.
    """
    steps = np.array([entry[0] for entry in history], dtype=np.float64)
    scores = np.array([entry[1] for entry in history], dtype=np.float64)  # [steps, layers]
    layers = scores.shape[1]
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 50, width - 60, 10, height - 30
    finite = scores[np.isfinite(scores)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high - low < 1e-6:
        low, high = low - 0.5e-3, high + 0.5e-3
    first, last = float(steps[0]), float(max(steps[-1], steps[0] + 1))

    def px(step: float) -> int:
        return int(round(left + (step - first) / (last - first) * (right - left)))

    def py(score: float) -> int:
        return int(round(bottom - (score - low) / (high - low) * (bottom - top)))

    colours = _palette(layers)
    for event in events:
        x = px(min(max(event["step"], first), last))
        colour = (150, 150, 150) if event["layer"] is None else colours[event["layer"]]
        canvas[top:bottom:2 if event["kind"] == "freeze" else 1, x] = colour
    for layer in range(layers):
        points = [(px(s), py(v)) for s, v in zip(steps, scores[:, layer]) if math.isfinite(v)]
        for (x0, y0), (x1, y1) in zip(points, points[1:] or points):
            for t in np.linspace(0.0, 1.0, max(abs(x1 - x0), abs(y1 - y0), 1) + 1):
                x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
                canvas[max(y - 1, 0): y + 1, x: x + 1] = colours[layer]
    canvas[top:bottom + 1, [left, right]] = 0
    canvas[[top, bottom], left:right + 1] = 0
    _text(canvas, 4, top, f"{high:.3f}")
    _text(canvas, 4, bottom - 10, f"{low:.3f}")
    _text(canvas, left, bottom + 8, str(int(first)))
    _text(canvas, right - 8 * len(str(int(last))), bottom + 8, str(int(last)))
    row_height = max(8, min(14, (bottom - top) // max(layers, 1)))
    for layer in range(layers):
        y = top + layer * row_height
        canvas[y: y + 8, right + 6: right + 14] = colours[layer]
        _text(canvas, right + 18, y - 1, str(layer), scale=1 if row_height < 12 else 2)
    _write_png(Path(path), canvas)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB ``uint8 [h, w, 3]`` image as a PNG (filter 0 on every row, zlib-compressed)."""
    height, width, _ = rgb.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
