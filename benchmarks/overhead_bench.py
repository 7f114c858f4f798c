"""Stack overhead, measured side by side: our model against plain Megatron-Core of the same shape.

Four models of one shape (d=512, 8 layers, 8 query heads in 4 KV groups, SwiGLU FFN 1408, RMSNorm,
RoPE, vocab 8192, T=1024, micro-batch 2), the same weights, a full training step each (forward,
backward, DDP gradient reduction, AdamW), cases interleaved:

    megatron   GPTModel with Megatron-Core's own local layer spec (get_gpt_layer_local_spec)
    local      build_model, every capability off, model.attention_backend: local (Megatron's
               DotProductAttention, so the same kernels as ``megatron``): the stack's own overhead
    ours       build_model, every capability off, the default attention backend (sdpa)
    idle       build_model with hybrid attention and looping switched on but idle: every head full
               attention (the hybrid module's SDPA path) and no loop

Before timing, the first step's losses are compared: the models must compute the same loss
(1e-5 relative), so that the times compare the same function. Target: local / megatron <= 1.05.

    python -m benchmarks.overhead_bench [--reps 5]
"""

from __future__ import annotations

from typing import Dict, List

import torch

from benchmarks.common import command_line, interleaved, median, ratio, row, single_process_megatron, training_step

SHAPE = dict(
    num_layers=8,
    hidden_size=512,
    num_attention_heads=8,
    num_query_groups=4,
    ffn_hidden_size=1408,
    vocab_size=8192,
    attention_dropout=0.0,
    hidden_dropout=0.0,
)
SEQ, MICRO_BATCH = 1024, 2


def run_config(capabilities: bool, attention_backend: str = "sdpa"):
    from megatron_ext.config import from_dict
    from megatron_ext.run import RunConfig

    sections = {
        "model": {**SHAPE, "attention_backend": attention_backend},
        "data": {"seq_length": SEQ},
        "train": {"micro_batch_size": MICRO_BATCH, "global_batch_size": MICRO_BATCH},
    }
    if capabilities:
        sections["hybrid_attention"] = {"enabled": True, "window": 128, "mask_learning_steps": 1}  # no callback here
        sections["looping"] = {"enabled": True}
    return from_dict(RunConfig, sections)


def megatron_model(cfg):
    """Plain Megatron-Core GPTModel with its local layer spec and our config of the run."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_ext.models.vocab import padded_vocab_size
    from megatron_ext.run.builder import transformer_config

    config = transformer_config(cfg, cuda=torch.cuda.is_available())
    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.model.qk_layernorm, normalization=cfg.model.normalization)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(cfg.model.vocab_size),
        max_sequence_length=cfg.data.seq_length,
        position_embedding_type=cfg.model.position_embedding,
        rotary_base=cfg.model.rotary_base,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
    )
    return model.cuda() if torch.cuda.is_available() else model


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Same parameter names in both models (Megatron's module tree); copy every one."""
    params = dict(source.named_parameters())
    names = [name for name, _ in target.named_parameters()]
    if sorted(names) != sorted(params):
        raise RuntimeError(f"the models' parameters differ: {sorted(set(names) ^ set(params))}")
    with torch.no_grad():
        for name, param in target.named_parameters():
            param.copy_(params[name])


def idle_capabilities(model: torch.nn.Module) -> None:
    """Every hybrid layer full attention (static, no SWA head) and no loop."""
    from megatron_ext.consa.attention import HybridCoreAttention
    from megatron_ext.sgt.looped_layer import LoopedTransformerLayer

    for module in model.modules():
        if isinstance(module, HybridCoreAttention):
            module.set_static([True] * module.num_kv_heads)
        if isinstance(module, LoopedTransformerLayer):
            module.set_loop(0)


def build_steps() -> Dict[str, object]:
    from megatron_ext.run.builder import build_model

    single_process_megatron()
    cuda = torch.cuda.is_available()
    cfg = run_config(capabilities=False)
    torch.manual_seed(0)
    (ours,) = build_model(cfg, cuda=cuda)
    plain = megatron_model(cfg)
    copy_weights(ours, plain)
    local_cfg = run_config(capabilities=False, attention_backend="local")
    (local,) = build_model(local_cfg, cuda=cuda)
    copy_weights(ours, local)
    idle_cfg = run_config(capabilities=True)
    (idle,) = build_model(idle_cfg, cuda=cuda)
    copy_weights(ours, idle)
    idle_capabilities(idle)
    steps = {
        "megatron": training_step(cfg, [plain]),
        "local": training_step(local_cfg, [local]),
        "ours": training_step(cfg, [ours]),
        "idle": training_step(idle_cfg, [idle]),
    }
    losses = {name: step() for name, step in steps.items()}
    for name, loss in losses.items():
        if abs(loss - losses["megatron"]) > 1e-5 * abs(losses["megatron"]):
            raise RuntimeError(f"first-step losses differ, the models do not compute the same function: {losses}")
    return steps


def run(reps: int = 5) -> List[Dict[str, object]]:
    t = interleaved(build_steps(), reps)
    tokens = SEQ * MICRO_BATCH
    return [
        row(
            "overhead",
            "step time ours, capabilities off, Megatron's attention / Megatron-Core local spec",
            ratio(t, "local", "megatron"),
            "<= 1.05",
        ),
        row(
            "overhead",
            "step time ours, capabilities off, default (SDPA) attention / Megatron-Core local spec",
            ratio(t, "ours", "megatron"),
            "report",
        ),
        row(
            "overhead",
            "step time ours, hybrid attention + looping idle / Megatron-Core local spec",
            ratio(t, "idle", "megatron"),
            "report",
        ),
        row("overhead", "tokens/s Megatron-Core local spec", tokens / median(t, "megatron"), "report"),
        row(
            "overhead", "tokens/s ours (default configuration, capabilities off)", tokens / median(t, "ours"), "report"
        ),
    ]


if __name__ == "__main__":
    command_line(run, __doc__)
