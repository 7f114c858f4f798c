"""SGT (arXiv 2603.23998) in the training loop: measure head entropy, grow loops on schedule, report,
checkpoint.

Per optimizer step, on every rank:

1. ``on_step_begin``: each looped layer gets its loop depth and head factors for the step.
2. During forward, every :class:`LoopedTransformerLayer` of this rank hands its local heads'
   last-query entropy (mean over the micro-batch) to this callback, once per micro-batch.
3. ``on_step_end``: the step's per-layer means over micro-batches are assembled into one
   ``[num_layers, num_heads]`` matrix that every rank holds: each rank writes its layers (pipeline
   stage) and its heads (tensor-parallel slice), zeros elsewhere, and the matrix is summed over the
   tensor- and the pipeline-parallel group. :class:`EntropyTracker` averages it over the
   data-parallel group and folds it into the EMA; :class:`GrowthScheduler` then takes its
   decisions, identically on every rank, and the local looped layers follow them. [choice] Once no
   measurement can change the schedule, the entropy hooks are removed (no cost left).

Metrics (of the step just run): ``sgt/looped_layers``, ``sgt/loop_depths`` (one int per layer),
``sgt/flops_overhead`` (analytical training FLOPs relative to the vanilla model,
:mod:`megatron_ext.sgt.flops`) and ``sgt/entropy/<layer>`` (the layer's EMA score). At the end of
training rank 0 writes ``plots/sgt_entropy.png``: the layer scores over the steps, one line per
layer, and a vertical line in the layer's colour at each selection or deepening (grey: freeze).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_ext.capability import Callback, TrainContext
from megatron_ext.sgt.config import LoopingConfig
from megatron_ext.sgt.entropy import EntropyTracker, merge_loop_entropy
from megatron_ext.sgt.flops import GPTShape, LoopedLayer, LoopStructure, flops_overhead
from megatron_ext.sgt.looped_layer import LoopedTransformerLayer
from megatron_ext.sgt.plots import plot_entropy
from megatron_ext.sgt.scheduler import Event, GrowthScheduler

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

    name = "looping"
    state_aliases = ("sgt",)
    metric_prefixes = ("sgt/",)

    def __init__(
        self,
        config: LoopingConfig,
        num_layers: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        flops_shape: Optional[GPTShape] = None,
        log: Callable[[str], None] = print,
    ):
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
        self.layers = {
            module.layer_index: module
            for chunk in ctx.model
            for module in chunk.modules()
            if isinstance(module, LoopedTransformerLayer)
        }
        if not self.layers:
            raise RuntimeError(
                "looping is enabled but the model has no LoopedTransformerLayer: build its "
                "layer specs with megatron_ext.sgt.looped_layer.looped_layer_spec"
            )
        heads = {layer.num_heads for layer in self.layers.values()}
        if heads != {self.num_heads}:
            raise ValueError(
                f"SGTCallback was built for {self.num_heads} heads per layer; the model's looped "
                f"layers have {sorted(heads)}"
            )
        groups = ctx.pg_collection
        self._tp_group, self._pp_group, self._dp_group = groups.tp, groups.pp, groups.dp
        if self.flops_shape is None:
            from megatron_ext.models.vocab import padded_vocab_size

            self.flops_shape = GPTShape.from_run_config(ctx.config, padded_vocab_size(ctx.config.model.vocab_size))
        self._apply_structure(ctx.step + 1)  # after a resume: the loaded schedule's structure
        self._set_tracking(self._tracking_wanted())

    def _set_tracking(self, on: bool) -> None:
        for index, layer in self.layers.items():
            layer.set_entropy_sink(partial(self._observe, index) if on else None)
        self._tracking = on

    def _observe(self, layer: int, entropy: torch.Tensor, last_loop: Optional[torch.Tensor] = None) -> None:
        """Entropy sink of ``layer``: one micro-batch's ``[local heads]`` mean over the batch, of the
        ordinary pass and of the last loop pass; a selected layer's kept heads take the latter [code]."""
        if last_loop is not None and self.config.method == "sgt" and layer in self.scheduler.loop_depths:
            heads = self.layers[layer].local_head_range
            kept = [h - heads.start for h in self.scheduler.kept_heads(layer) if h in heads]
            entropy = merge_loop_entropy(entropy, last_loop, kept)
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
        self._step_structure = self.structure(step)
        self._step_metrics = {
            "sgt/looped_layers": len(depths),
            "sgt/loop_depths": [depths.get(layer, 0) for layer in range(self.num_layers)],
            "sgt/flops_overhead": flops_overhead(self.flops_shape, self._step_structure),
        }

    def adjust_cost(self, ctx: TrainContext, cost) -> None:
        """The step's loops: an SGT pass adds the attention of the heads it computed, a block-loop pass
        the whole layer."""
        structure = getattr(self, "_step_structure", None)
        if structure is None:
            return
        for index, looped in structure.layers.items():
            layer = cost.layers[index]
            if structure.method == "block":
                layer.passes += looped.depth
                continue
            keys = (
                looped.query_heads * cost.seq_length if looped.key_pairs is None else looped.key_pairs / cost.seq_length
            )
            layer.extra_attention.extend([(looped.query_heads, looped.kv_heads, keys)] * looped.depth)

    def on_step_end(self, ctx: TrainContext, result) -> Dict[str, object]:
        if self._tracking:
            observed = self._gather_step_entropy()  # a collective: every rank, also in a skipped step
            # A step whose update was skipped (non-finite loss or gradients) or whose entropy is not
            # finite leaves the EMAs as they were, as the optimizer leaves the weights.
            finite = torch.tensor([float(all(bool(torch.isfinite(e).all()) for e in observed.values()))])
            if self._dp_group is not None and dist.get_world_size(group=self._dp_group) > 1:
                from megatron_ext.parallel.state import comm_device

                finite = finite.to(comm_device())
                dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self._dp_group)  # one decision for all
            usable = getattr(result, "update_successful", True) and bool(finite.item() > 0)
            if usable:
                for layer, entropy in observed.items():
                    self.tracker.accumulate(layer, entropy)
            self.tracker.end_step(self._dp_group if usable else None)
            scores = self.tracker.layer_scores()
            self.history.append([ctx.step, [scores.get(layer, math.nan) for layer in range(self.num_layers)]])
        events = self.scheduler.step(ctx.step, self.tracker.layer_scores(), self.tracker.head_emas())
        for event in events:
            self.events.append(_event_to_dict(event))
            if dist.get_rank() == 0:
                self.log(_describe(event, self.config.method))
        self._apply_structure(ctx.step + 1)  # evaluation right after this step runs the new structure
        tracked = self._tracking
        if self._tracking and not self._tracking_wanted():
            self._set_tracking(False)
        metrics = dict(self._step_metrics)
        if tracked:  # a score that is no longer measured is not reported as if it were
            metrics.update({f"sgt/entropy/{layer}": score for layer, score in self.tracker.layer_scores().items()})
        return metrics

    def _tracking_wanted(self) -> bool:
        return self.scheduler.tracking_needed or self.config.compute_entropy_after_fixed

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
            matrix[index, heads.start : heads.stop] = total.double() / self._counts[index]
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
        """What the model computes at ``step`` (a collective over the TP and PP groups): for an SGT
        layer the heads its loop computes (the kept ones once the fade is over, every head while it
        runs) and their KV groups; per layer the (query, key) pairs its kernels multiply (a hybrid
        layer's sliding-window heads fewer) in the ordinary pass and in a loop pass; the layers this
        step skips (elastic depth)."""
        from megatron_ext.compat.layers import is_skipped
        from megatron_ext.parallel.state import comm_device

        group_size = self.num_heads // self.num_kv_heads
        seq = self.flops_shape.seq_length
        computed: Dict[int, List[int]] = {}
        for index in self.scheduler.loop_depths:
            factors = self.scheduler.head_factors(index, step)
            settled = all(f in (0.0, 1.0) for f in factors)
            computed[index] = [h for h, f in enumerate(factors) if f > 0.0] if settled else list(range(self.num_heads))
        # Per layer: pairs of the ordinary pass, of one loop pass (this rank's heads), skipped (TP rank 0).
        table = torch.zeros(self.num_layers, 3, dtype=torch.float64, device=comm_device())
        first_tp_rank = dist.get_rank(group=self._tp_group) == 0 if self._tp_group is not None else True
        for index, layer in self.layers.items():
            per_kv = layer.attention_pairs(seq)
            heads = layer.local_head_range
            local_group = len(heads) // len(per_kv)
            table[index, 0] = sum(per_kv[(h - heads.start) // local_group] for h in heads)
            table[index, 1] = sum(
                per_kv[(h - heads.start) // local_group] for h in computed.get(index, ()) if h in heads
            )
            if first_tp_rank:
                table[index, 2] = float(is_skipped(layer))
        for group in (self._tp_group, self._pp_group):
            if group is not None and dist.get_world_size(group=group) > 1:
                dist.all_reduce(table, group=group)
        table = table.cpu()
        layers = {
            index: LoopedLayer(
                self.scheduler.loop_depths[index],
                len(heads),
                len({h // group_size for h in heads}),
                int(table[index, 1]),
            )
            for index, heads in computed.items()
        }
        return LoopStructure(
            self.config.method,
            layers,
            layer_key_pairs={i: int(table[i, 0]) for i in range(self.num_layers)},
            skipped=frozenset(i for i in range(self.num_layers) if table[i, 2] > 0.5),
        )

    def on_train_end(self, ctx: TrainContext) -> None:
        if dist.get_rank() == 0 and self.history:
            plots = Path(ctx.run_dir) / "plots"
            plots.mkdir(parents=True, exist_ok=True)
            plot_entropy(plots / "sgt_entropy.png", self.history, self.events, final_step=ctx.step)

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
    return {
        "kind": event.kind,
        "step": event.step,
        "layer": event.layer,
        "depth": event.depth,
        "kept_heads": list(event.kept_heads),
    }


def _describe(event: Event, method: str) -> str:
    if event.kind == "freeze":
        return f"sgt: step {event.step}: loop structure frozen"
    what = "select" if event.kind == "select" else "deepen"
    heads = f", kept heads {list(event.kept_heads)}" if method == "sgt" else ""
    return f"sgt: step {event.step}: {what} layer {event.layer} (loop depth {event.depth}{heads})"
