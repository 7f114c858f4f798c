"""Tiny random HF models built locally (no downloads), and our model's logits on a layout."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def build_hf(kind: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random HF model of ``kind``; every weight (norms too) is random, so that a tensor
    mapped to the wrong place shows in the logits."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "dense":  # untied, vocabulary not a multiple of 128, head_dim != hidden / heads
        model = tf.Qwen3ForCausalLM(
            tf.Qwen3Config(**COMMON, head_dim=24, intermediate_size=96, tie_word_embeddings=False)
        )
    elif kind == "layerwise":  # Qwen3 with mixed layer_types
        model = tf.Qwen3ForCausalLM(
            tf.Qwen3Config(
                **COMMON,
                head_dim=16,
                intermediate_size=96,
                use_sliding_window=True,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            )
        )
    elif kind == "qwen3_moe":  # softmax top-2, renormalised; a dense first layer
        model = tf.Qwen3MoeForCausalLM(
            tf.Qwen3MoeConfig(
                **COMMON,
                head_dim=16,
                intermediate_size=96,
                moe_intermediate_size=32,
                num_experts=6,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                mlp_only_layers=[0],
            )
        )
    elif kind == "dots1":  # sigmoid + correction bias + 2 shared experts; first layer dense; tied embeddings
        model = tf.Dots1ForCausalLM(
            tf.Dots1Config(
                **COMMON,
                head_dim=16,
                intermediate_size=96,
                moe_intermediate_size=32,
                n_routed_experts=6,
                num_experts_per_tok=2,
                n_shared_experts=2,
                first_k_dense_replace=1,
                norm_topk_prob=True,
                sliding_window=None,
                tie_word_embeddings=True,
            )
        )
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.05)
    model.save_pretrained(out)
    return out


def hf_logits(hf_dir: Path, tokens: torch.Tensor, remote: bool = False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=remote).eval()
    with torch.no_grad():
        return model(tokens).logits


def our_logits(run_dir: str, tokens: torch.Tensor, tp: int) -> torch.Tensor:
    """Rank body: the logits of ``run_dir``'s latest checkpoint at TP = ``tp`` (sequence parallel
    when tp > 1), gathered over the TP group, the vocabulary padding cut off."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_ext.run import load_config
    from megatron_ext.training.evaluate import load_trained

    cfg = load_config(Path(run_dir) / "config.yaml")
    cfg.parallel.tensor = tp
    cfg.parallel.sequence_parallel = tp > 1
    (model,), _, _ = load_trained(cfg, Path(run_dir))
    model.eval()
    if cfg.model.mtp_num_layers is not None:
        # megatron-core 0.16.1's GPTModel with MTP layers needs labels in forward; the cached
        # decoder computes the logits from the same modules (one rank).
        from megatron_ext.inference.decode import Decoder
        from megatron_ext.training.capabilities import batch_hooks

        decoder = Decoder(model, batch_hooks(cfg))
        return decoder.prefill(tokens, decoder.new_cache(*tokens.shape))[..., : cfg.model.vocab_size]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, positions, attention_mask=None))
    return logits[..., : cfg.model.vocab_size]


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())
