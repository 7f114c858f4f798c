"""The callbacks of the capabilities a config switches on (the loop itself stays generic)."""

from __future__ import annotations

from typing import Callable, List

from megatron_ext.config.schema import RunConfig
from megatron_ext.training.callbacks import Callback


def capability_callbacks(cfg: RunConfig, log: Callable = print) -> List[Callback]:
    callbacks: List[Callback] = []
    if cfg.hybrid_attention.enabled:
        from megatron_ext.consa.callback import ConSACallback

        callbacks.append(ConSACallback(
            cfg.hybrid_attention, cfg.model.num_layers,
            cfg.model.num_query_groups or cfg.model.num_attention_heads,
            tokens_per_step=cfg.train.global_batch_size * cfg.data.seq_length, seed=cfg.train.seed, log=log))
    if cfg.moe.enabled:
        from megatron_ext.moe.callback import MoECallback

        callbacks.append(MoECallback(cfg.elastic, cfg.routing, cfg.model.num_layers, cfg.moe.num_experts,
                                     cfg.moe.top_k, seed=cfg.train.seed))
    if cfg.looping.enabled:
        from megatron_ext.sgt.callback import SGTCallback

        callbacks.append(SGTCallback(
            cfg.looping, cfg.model.num_layers, cfg.model.num_attention_heads,
            num_kv_heads=cfg.model.num_query_groups or cfg.model.num_attention_heads, log=log))
    return callbacks
