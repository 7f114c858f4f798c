"""The callbacks of the capabilities a config switches on (the loop itself stays generic)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List

from megatron_ext.config.schema import RunConfig
from megatron_ext.training.callbacks import Callback, TrainContext


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


def restore_capabilities(cfg: RunConfig, model_chunks: list, common: dict, run_dir: Path) -> List[Callback]:
    """Give model chunks loaded from a checkpoint the structure training left them in.

    A checkpoint's weights alone are not the trained model: the hybrid attention allocation (or the
    gates, during mask learning) and the SGT loops grown so far live in the capability callbacks'
    states (``common["callbacks"]``, as :meth:`CheckpointManager.load` returns it). This loads those
    states and wires the callbacks to the chunks exactly as a resumed run does, for evaluation and
    extraction. The callbacks are not stepped: MoE routing stays at the full width and default
    top-k (no elastic sub-network is sampled). Returns the callbacks (their state is readable).
    """
    callbacks = capability_callbacks(cfg, log=lambda *args: None)
    ctx = TrainContext(config=cfg, model=list(model_chunks), optimizer=None, run_dir=Path(run_dir),
                       step=common.get("step", 0), consumed_samples=common.get("consumed_samples", 0))
    states = common.get("callbacks") or {}
    for cb in callbacks:
        cb.load_state_dict(states.get(cb.name, {}))
        cb.on_train_start(ctx)
    return callbacks
