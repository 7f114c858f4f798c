"""Hybrid full / sliding-window attention (ConSA, arXiv 2606.18056, and its rule baselines) as a
:class:`~megatron_ext.capability.Capability`.

Model: every layer's core attention becomes :class:`~megatron_ext.consa.attention.HybridCoreAttention`
(its mode, full / gated / static, is set by the callback). Training: :class:`ConSACallback` (gates,
constraint, binarization). Sub-models: a kept layer keeps its row of the trained allocation, and the
sub-model is a static hybrid reading its own ``allocation.json``.

Modules that import torch or Megatron are imported inside the hooks, so that the run config (which
imports every capability for its sections) stays light to load.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping

from megatron_ext.capability import Capability
from megatron_ext.consa.config import HybridAttentionConfig


class HybridAttention(Capability):
    name = "hybrid_attention"
    sections = {"hybrid_attention": HybridAttentionConfig}

    def enabled(self, cfg) -> bool:
        return cfg.hybrid_attention.enabled

    def check(self, cfg, *, world_size: int, data_parallel: int, cuda: bool) -> List[str]:
        h, m = cfg.hybrid_attention, cfg.model
        if not h.enabled:
            return []
        problems = []
        if m.attention_dropout > 0:
            problems.append(
                f"model.attention_dropout={m.attention_dropout}: hybrid attention kernels have no "
                "attention dropout; set it to 0"
            )
        if h.window >= cfg.data.seq_length:
            problems.append(
                f"hybrid_attention.window={h.window} >= data.seq_length={cfg.data.seq_length}: a "
                "sliding window that long sees every key, so no unit would attend less; use a window "
                "shorter than the sequence"
            )
        problems += _whole_number_of_units(h, m.num_layers, m.num_query_groups or m.num_attention_heads)
        if h.method == "rule_layer" and h.layer_pattern:
            from megatron_ext.consa.allocation import rule_layer_allocation

            swa = int((~rule_layer_allocation(m.num_layers, h.layer_pattern)).sum())
            if swa != round(h.target * m.num_layers):
                problems.append(
                    f"hybrid_attention.layer_pattern={h.layer_pattern!r} makes {swa} of the "
                    f"{m.num_layers} layers SWA, hybrid_attention.target={h.target} asks for "
                    f"{round(h.target * m.num_layers)}: change one of them, or leave layer_pattern "
                    "unset to derive it from the target"
                )
        if h.method == "static" and h.allocation:
            from megatron_ext.consa.allocation import read_allocation

            try:
                read_allocation(h.allocation, m.num_layers, m.num_query_groups or m.num_attention_heads)
            except (OSError, ValueError) as err:
                problems.append(f"hybrid_attention.allocation: {err}")
        return problems

    def layer_specs(self, cfg, specs: list, backend: str) -> list:
        from megatron_ext.consa.attention import HybridCoreAttention
        from megatron_ext.models.layer_spec import map_specs, replace_submodule

        h = cfg.hybrid_attention
        core = partial(HybridCoreAttention, window=h.window, sink=h.sink_tokens, backend=backend)
        return map_specs(specs, lambda spec: replace_submodule(spec, "self_attention.core_attention", core))

    def callback(self, cfg, log, consumed_tokens):
        from megatron_ext.consa.callback import ConSACallback

        return ConSACallback(
            cfg.hybrid_attention,
            cfg.model.num_layers,
            cfg.model.num_query_groups or cfg.model.num_attention_heads,
            consumed_tokens=consumed_tokens,
            seed=cfg.train.seed,
            log=log,
        )

    def submodel_config(self, cfg, small, sub, output: Path) -> None:
        small.hybrid_attention = dataclasses.replace(
            small.hybrid_attention,
            method="static",
            allocation=str(output.resolve() / "allocation.json"),
            mask_learning_steps=None,
            mask_learning_tokens=None,
        )

    def submodel_state(self, cfg, callback, sub, source_step: int, output: Path, is_writer: bool):
        from megatron_ext.consa.allocation import write_allocation

        if callback.allocation is None:
            end = callback.start_step + callback.stage_steps
            raise ValueError(
                f"the checkpoint of step {source_step} is from before binarization (hybrid_attention "
                f"stages 0-1: step <= {end}), whose attention is full or gated, not static: extract "
                "from a checkpoint saved after binarization"
            )
        if is_writer:  # the sub-model's config points here
            h = cfg.hybrid_attention
            write_allocation(
                output / "allocation.json",
                callback.allocation[list(sub.layers)],
                granularity=h.granularity,
                window=h.window,
                target=h.target,
                method=f"{h.method} (layers {list(sub.layers)} of {cfg.name})",
            )
        return None

    # -- HF interop: a layer-wise hybrid as the stock classes' layer_types, a KV-head-wise one per head ------
    def hf_config(self, cfg, callback, hf: Dict[str, Any]) -> List[str]:
        from megatron_ext.hf.config import FULL_HEADS_KEY

        h = cfg.hybrid_attention
        if not h.enabled:
            return []
        if callback is not None and callback.allocation is None and getattr(callback, "learned", False):
            if callback.stage(callback.current_step - 1) == 0:  # a checkpoint of the dense warm-up
                return []  # full attention in every layer: the dense model it is
        problems = []
        if h.sink_tokens:
            problems.append(
                f"hybrid_attention.sink_tokens={h.sink_tokens}: sink + recent attention has no HF "
                "modeling file here (only sliding windows)"
            )
        allocation = None if callback is None else callback.allocation
        if allocation is None:
            problems.append(
                "hybrid_attention: the checkpoint is from before binarization (its attention is full or "
                "gated, not a static hybrid): export a checkpoint saved after mask learning ended"
            )
            return problems
        kv_heads = cfg.model.num_query_groups or cfg.model.num_attention_heads
        rows = allocation.expand(-1, kv_heads) if allocation.shape[1] == 1 else allocation
        hf["sliding_window"] = h.window
        if all(len(set(row)) == 1 for row in rows.tolist()):
            hf.update(
                use_sliding_window=True,
                max_window_layers=0,
                layer_types=["full_attention" if row[0] else "sliding_attention" for row in rows.tolist()],
            )
        else:
            hf[FULL_HEADS_KEY] = rows.int().tolist()
        return problems

    def hf_sections(self, hf: Mapping[str, Any], output: Path, problems: List[str]) -> Dict[str, Dict[str, Any]]:
        import torch

        from megatron_ext.consa.allocation import swa_fraction, write_allocation
        from megatron_ext.hf.config import FULL_HEADS_KEY, WINDOW_KEY, sliding_layers

        layers = hf["num_hidden_layers"]
        if hf.get(FULL_HEADS_KEY) is not None:
            allocation = torch.tensor(hf[FULL_HEADS_KEY], dtype=torch.bool)
            window = hf[WINDOW_KEY]
            write_allocation(
                output / "allocation.json",
                allocation,
                granularity="kv_head",
                window=window,
                target=swa_fraction(allocation),
                method=f"static (imported from {hf['model_type']})",
            )
            return {
                "hybrid_attention": {
                    "enabled": True,
                    "method": "static",
                    "granularity": "kv_head",
                    "window": window,
                    "target": swa_fraction(allocation),
                    "allocation": str(output.resolve() / "allocation.json"),
                }
            }
        sliding = sliding_layers(hf)
        if not any(sliding):
            return {}  # full attention everywhere: a run may still learn a hybrid from it (ConSA)
        return {
            "hybrid_attention": {
                "enabled": True,
                "method": "rule_layer",
                "granularity": "layer",
                "window": hf["sliding_window"],
                "target": sum(sliding) / layers,
                "layer_pattern": "".join("S" if s else "F" for s in sliding),
            }
        }


def _whole_number_of_units(h, num_layers: int, kv_heads: int) -> List[str]:
    """A target that is not a whole number of the units it counts: binarization would round it (half to
    even) to another fraction than the one asked for (rho 0.75 of 2 KV heads a layer is 2 SWA heads,
    every unit), and the comparison with the method would be at another rho."""
    if h.method == "static" or (h.method == "rule_layer" and h.layer_pattern):
        return []  # a static allocation has no target; a layer pattern is checked against it below
    hint = ""
    if h.granularity == "layer" or h.method == "rule_layer":
        units, what = num_layers, f"{num_layers} layers"
    elif h.method == "rule_head" or h.constraint == "per_layer":
        units, what = kv_heads, f"{kv_heads} KV heads of each layer"
        hint = "" if h.method == "rule_head" else " or constraint: global"
    else:
        units, what = num_layers * kv_heads, f"{num_layers} x {kv_heads} KV heads"
    exact = h.target * units
    if abs(exact - round(exact)) <= 0.05:  # a rounded decimal (0.67 of 3 layers) is meant as the whole number
        return []
    return [
        f"hybrid_attention.target={h.target} of the {what} is {exact:g} SWA units, not a whole number: the "
        f"allocation would make {round(exact)} of {units} SWA (rho {round(exact) / units:g}); choose a "
        f"target that is a multiple of 1/{units} (to two decimals)" + hint
    ]
