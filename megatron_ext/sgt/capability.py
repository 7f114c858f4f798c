"""Training-time sparse looping (SGT, arXiv 2603.23998, and the whole-block baseline) as a
:class:`~megatron_ext.capability.Capability`.

Model: every layer is a :class:`~megatron_ext.sgt.looped_layer.LoopedTransformerLayer` (no loop until
the callback grows one). Training: :class:`SGTCallback` (entropy, growth schedule). Sub-models: the
kept layers keep their loops (the schedule's state, renumbered).

Modules that import torch or Megatron are imported inside the hooks, so that the run config stays
light to load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List

from megatron_ext.capability import Capability
from megatron_ext.sgt.config import LoopingConfig


class Looping(Capability):
    name = "looping"
    sections = {"looping": LoopingConfig}

    def enabled(self, cfg) -> bool:
        return cfg.looping.enabled

    def check(self, cfg, *, world_size: int, data_parallel: int, cuda: bool) -> List[str]:
        if not cfg.looping.enabled:
            return []
        problems = [
            f"looping.{p}" for p in cfg.looping.problems_with_model(cfg.model.num_layers, cfg.model.num_attention_heads)
        ]
        return problems

    def te_unsupported(self, cfg) -> List[str]:
        return [
            "looping.enabled (the looped layer multiplies slices of an unfused QKV projection and runs its "
            "own attention over a few heads; the TE layer fuses the input norm into that projection)"
        ]

    def layer_specs(self, cfg, specs: list, backend: str) -> list:
        from megatron_ext.models.layer_spec import map_specs
        from megatron_ext.sgt.looped_layer import looped_layer_spec

        return map_specs(specs, looped_layer_spec)

    def callback(self, cfg, log, consumed_tokens):
        from megatron_ext.sgt.callback import SGTCallback

        return SGTCallback(
            cfg.looping,
            cfg.model.num_layers,
            cfg.model.num_attention_heads,
            num_kv_heads=cfg.model.num_query_groups or cfg.model.num_attention_heads,
            log=log,
        )

    def submodel_config(self, cfg, small, sub, output: Path) -> None:
        layer_map = {old: new for new, old in enumerate(sub.layers)}
        excluded = {layer_map[i] for i in cfg.looping.exclude_layers if i in layer_map}
        if 0 in cfg.looping.exclude_layers:  # "never the first layer" holds for the sub-model's first layer too
            excluded.add(0)
        small.looping = dataclasses.replace(small.looping, exclude_layers=sorted(excluded))

    def submodel_state(self, cfg, callback, sub, source_step: int, output: Path, is_writer: bool):
        return submodel_loop_state(callback.state_dict(), sub.layers, source_step)

    def hf_config(self, cfg, callback, hf):
        return [
            "looping.enabled=true: no HF modeling file runs SGT attention loops (this project's "
            "modeling_hybrid.py runs hybrid attention only); export a model trained without looping"
        ]


def submodel_loop_state(state: Dict, layers, source_step: int) -> Dict:
    """The SGT callback state of a sub-model keeping ``layers``: their loops (depth, kept heads, fade)
    renumbered, and steps shifted so that the sub-model's step 0 is the source's ``source_step``
    (a fade in progress continues where it was). Loops of dropped layers go with them."""
    layer_map = {old: new for new, old in enumerate(layers)}

    def kept(table: Dict) -> Dict:
        return {layer_map[int(layer)]: value for layer, value in table.items() if int(layer) in layer_map}

    schedule = state["scheduler"]
    window_end = schedule["window_end"]
    return {
        "scheduler": {
            "selected": [layer_map[int(layer)] for layer in schedule["selected"] if int(layer) in layer_map],
            "depth": kept(schedule["depth"]),
            "kept": kept(schedule["kept"]),
            "selected_at": {layer: int(step) - source_step for layer, step in kept(schedule["selected_at"]).items()},
            "window_end": None if window_end is None else int(window_end) - source_step,
            "frozen": schedule["frozen"],
        },
        "tracker": {
            "layers": list(range(len(layers))),
            "num_heads": state["tracker"]["num_heads"],
            "ema": kept(state["tracker"]["ema"]),
        },
        "history": [],
        "events": [],
    }
