"""Checks that need several sections or the launch: run before any process group exists."""

from __future__ import annotations

from typing import List

from megatron_ext.config.loader import ConfigError
from megatron_ext.config.schema import RunConfig


def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tensor * p.pipeline * p.context)


def check_run(cfg: RunConfig, world_size: int, *, cuda: bool) -> None:
    """Raise ConfigError listing every problem of ``cfg`` for a job of ``world_size`` ranks."""
    from megatron_ext.models.builder import moe_layer_pattern, padded_vocab_size

    problems: List[str] = []
    m, p, t, moe, d = cfg.model, cfg.parallel, cfg.train, cfg.moe, cfg.data
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        problems.append(
            f"world size {world_size} is not divisible by parallel.tensor * parallel.pipeline * "
            f"parallel.context = {p.tensor}*{p.pipeline}*{p.context} = {model_parallel}: the world "
            "size must equal TP*PP*CP*DP; change the parallel sizes or the number of processes"
        )
        dp = 0
    else:
        dp = world_size // model_parallel

    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % p.tensor:
        problems.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                        f"parallel.tensor={p.tensor}")
    if groups % p.tensor:
        problems.append(f"model.num_query_groups={groups} is not divisible by parallel.tensor={p.tensor}: "
                        "each TP rank must hold whole KV heads")
    if padded_vocab_size(m.vocab_size) % p.tensor:
        problems.append(f"padded vocabulary {padded_vocab_size(m.vocab_size)} is not divisible by "
                        f"parallel.tensor={p.tensor}")
    stages = p.pipeline * (p.virtual_pipeline or 1)
    if m.num_layers % stages:
        problems.append(f"model.num_layers={m.num_layers} is not divisible by the {stages} pipeline "
                        f"stages (parallel.pipeline={p.pipeline} x virtual_pipeline={p.virtual_pipeline or 1})")
    if p.sequence_parallel and p.tensor > 1 and d.seq_length % p.tensor:
        problems.append(f"data.seq_length={d.seq_length} is not divisible by parallel.tensor={p.tensor}, "
                        "which sequence parallelism needs")
    if p.context > 1:
        if d.seq_length % (2 * p.context):
            problems.append(f"data.seq_length={d.seq_length} is not divisible by 2 * parallel.context = "
                            f"{2 * p.context} (context parallelism splits the sequence into 2*CP chunks)")
        if not cuda:
            problems.append(f"parallel.context={p.context}: context parallelism needs Transformer "
                            "Engine attention on GPU; use parallel.context=1 on CPU")
    max_pos = m.max_position_embeddings or d.seq_length
    if max_pos < d.seq_length:
        problems.append(f"model.max_position_embeddings={max_pos} is shorter than data.seq_length={d.seq_length}")

    if moe.enabled:
        expert_tp = p.expert_tensor or p.tensor
        if moe.num_experts % p.expert:
            problems.append(f"moe.num_experts={moe.num_experts} is not divisible by parallel.expert={p.expert}")
        if dp and (dp * p.context * p.tensor) % (p.expert * expert_tp):
            problems.append(
                f"parallel.expert={p.expert} x expert_tensor={expert_tp} must divide data-parallel x "
                f"context x tensor = {dp}*{p.context}*{p.tensor} (Megatron carves expert parallelism "
                "out of the ranks of one pipeline stage)")
        if p.tensor > 1 and not p.sequence_parallel:
            problems.append("parallel.sequence_parallel must be true for MoE with parallel.tensor > 1 "
                            "(Megatron requires it)")
        pattern = moe_layer_pattern(cfg)
        if len(pattern) != m.num_layers:
            problems.append(f"moe.layer_pattern has {len(pattern)} entries for model.num_layers={m.num_layers}")
        elif not any(pattern):
            problems.append("moe.enabled is true but no layer is an MoE layer (moe.first_k_dense / layer_pattern)")
        problems.extend(cfg.routing.problems_with_model(moe.num_experts, moe.top_k, moe.score_function))
        e = cfg.elastic
        if e.enabled:
            problems.extend(e.problems_with_model(m.num_layers, moe.num_experts, moe.top_k))
        if cfg.routing.mode == "modality_isolated" and (e.enabled and e.width_full_prob < 1 or t.recompute == "full"):
            problems.append("routing.mode='modality_isolated' cannot be combined with elastic width or "
                            "train.recompute='full'")
    else:
        if p.expert > 1:
            problems.append(f"parallel.expert={p.expert} needs moe.enabled: true")
        if cfg.elastic.enabled:
            problems.append("elastic.enabled needs moe.enabled: true (elastic training samples MoE sub-networks)")

    if dp:
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            problems.append(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size}*{dp}")
    if t.precision == "bf16" and not cuda:
        problems.append("train.precision='bf16' needs a GPU (the CPU optimizer keeps no fp32 master "
                        "weights); use 'fp32' or 'auto'")
    if t.lr_schedule == "wsd" and t.wsd_decay_steps and t.wsd_decay_steps > t.steps - t.warmup_steps:
        problems.append(f"train.wsd_decay_steps={t.wsd_decay_steps} exceeds the steps after warmup "
                        f"({t.steps - t.warmup_steps})")
    if cfg.looping.enabled:
        problems.extend(cfg.looping.problems_with_model(m.num_layers, m.num_attention_heads))
        if p.context > 1:
            problems.append("looping with parallel.context > 1 is not supported")
    h = cfg.hybrid_attention
    if h.enabled:
        if m.attention_dropout > 0:
            problems.append(f"model.attention_dropout={m.attention_dropout}: hybrid attention kernels have no "
                            "attention dropout; set it to 0")
        if p.context > 1:
            problems.append("hybrid_attention with parallel.context > 1 is not supported")
        if h.method == "static" and h.allocation:
            from megatron_ext.consa.allocation import read_allocation

            try:
                read_allocation(h.allocation, m.num_layers, groups)
            except (OSError, ValueError) as err:
                problems.append(f"hybrid_attention.allocation: {err}")
    if d.kind == "indexed":
        from megatron_ext.data.indexed import DataError, check_prefix

        for prefix in d.paths:
            try:
                check_prefix(prefix, m.vocab_size, None if d.tokenizer is None else _identity(d.tokenizer))
            except (DataError, FileNotFoundError, ValueError) as err:
                problems.append(f"data.paths: {err}")
    if problems:
        raise ConfigError(problems)


def _identity(tokenizer_spec: str) -> str:
    from megatron_ext.data.tokenizers import load_tokenizer

    return load_tokenizer(tokenizer_spec).identity
