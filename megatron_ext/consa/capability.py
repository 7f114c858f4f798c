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
from typing import List

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
            problems.append(f"model.attention_dropout={m.attention_dropout}: hybrid attention kernels have no "
                            "attention dropout; set it to 0")
        if cfg.parallel.context > 1:
            problems.append("hybrid_attention with parallel.context > 1 is not supported")
        if h.method == "rule_layer" and h.layer_pattern:
            from megatron_ext.consa.allocation import rule_layer_allocation

            swa = int((~rule_layer_allocation(m.num_layers, h.layer_pattern)).sum())
            if swa != round(h.target * m.num_layers):
                problems.append(f"hybrid_attention.layer_pattern={h.layer_pattern!r} makes {swa} of the "
                                f"{m.num_layers} layers SWA, hybrid_attention.target={h.target} asks for "
                                f"{round(h.target * m.num_layers)}: change one of them, or leave layer_pattern "
                                "unset to derive it from the target")
        if h.method == "static" and h.allocation:
            from megatron_ext.consa.allocation import read_allocation

            try:
                read_allocation(h.allocation, m.num_layers, m.num_query_groups or m.num_attention_heads)
            except (OSError, ValueError) as err:
                problems.append(f"hybrid_attention.allocation: {err}")
        return problems

    def layer_specs(self, cfg, specs: list) -> list:
        from megatron_ext.consa.attention import HybridCoreAttention
        from megatron_ext.models.layer_spec import map_specs, replace_submodule

        h = cfg.hybrid_attention
        core = partial(HybridCoreAttention, window=h.window, sink=h.sink_tokens)
        return map_specs(specs, lambda spec: replace_submodule(spec, "self_attention.core_attention", core))

    def callback(self, cfg, log):
        from megatron_ext.consa.callback import ConSACallback

        return ConSACallback(cfg.hybrid_attention, cfg.model.num_layers,
                             cfg.model.num_query_groups or cfg.model.num_attention_heads,
                             tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_length,
                             seed=cfg.train.seed, log=log)

    def submodel_config(self, cfg, small, sub, output: Path) -> None:
        small.hybrid_attention = dataclasses.replace(
            small.hybrid_attention, method="static", allocation=str(output.resolve() / "allocation.json"),
            mask_learning_steps=None, mask_learning_tokens=None)

    def submodel_state(self, cfg, callback, sub, source_step: int, output: Path, is_writer: bool):
        from megatron_ext.consa.allocation import write_allocation

        if callback.allocation is None:
            end = callback.start_step + callback.stage_steps
            raise ValueError(f"the checkpoint of step {source_step} is from before binarization (hybrid_attention "
                             f"stages 0-1: step <= {end}), whose attention is full or gated, not static: extract "
                             "from a checkpoint saved after binarization")
        if is_writer:  # the sub-model's config points here
            h = cfg.hybrid_attention
            write_allocation(output / "allocation.json", callback.allocation[list(sub.layers)],
                             granularity=h.granularity, window=h.window, target=h.target,
                             method=f"{h.method} (layers {list(sub.layers)} of {cfg.name})")
        return None
