"""Rank bodies for the distributed tests: tiny GPT models, one step, and what to compare.

Each body runs on every rank under Megatron's parallel state (see megatron_ext.testing) and
returns full, unsharded tensors (``full_named_tensors``) so that runs with different layouts
compare key by key.
"""

import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer import TransformerConfig

from megatron_ext.models.layer_spec import decoder_block_spec, gpt_layer_spec
from megatron_ext.optim import build_optimizer
from megatron_ext.parallel import full_named_tensors, load_full_named_tensors, main_grad_or_grad
from megatron_ext.training.ddp import wrap_with_ddp
from megatron_ext.training.step import gpt_forward_step, train_step

VOCAB = 128
SEQ = 16


def tiny_config_kwargs(num_layers=2, sequence_parallel=None, **overrides) -> dict:
    """``TransformerConfig`` keywords of the tiny GPT the distributed tests build (RoPE, RMSNorm,
    SwiGLU, GQA, fp32, no dropout) at the current parallel state's sizes, with ``overrides``."""
    kwargs = dict(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        # Megatron requires sequence parallelism for MoE with TP > 1.
        sequence_parallel=(
            parallel_state.get_tensor_model_parallel_world_size() > 1
            if sequence_parallel is None
            else sequence_parallel
        ),
    )
    kwargs.update(overrides)
    return kwargs


def build_gpt(seed=1234, num_layers=2, num_experts=None, shared_expert=False, sequence_parallel=None, **overrides):
    """A tiny GPT (RoPE, RMSNorm, SwiGLU, GQA) for the current parallel state; weights from seed."""
    torch.manual_seed(seed)
    kwargs = tiny_config_kwargs(num_layers, sequence_parallel)
    if num_experts:
        kwargs.update(
            num_moe_experts=num_experts,
            moe_router_topk=2,
            moe_ffn_hidden_size=32,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="none",
            moe_shared_expert_intermediate_size=32 if shared_expert else None,
        )
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    spec = decoder_block_spec(config, [gpt_layer_spec(num_experts=num_experts)] * num_layers)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def make_batch(index, micro_batch=2):
    """Deterministic micro-batch number ``index`` (same on every rank that asks for it)."""
    g = torch.Generator().manual_seed(1000 + index)
    tokens = torch.randint(0, VOCAB, (micro_batch, SEQ + 1), generator=g)
    loss_mask = torch.ones(micro_batch, SEQ)
    loss_mask[0, : SEQ // 4] = 0.0  # a non-trivial mask
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(SEQ).unsqueeze(0).expand(micro_batch, SEQ).contiguous(),
        "modality_ids": torch.zeros(micro_batch, SEQ, dtype=torch.long),
        "label_modality_ids": torch.zeros(micro_batch, SEQ, dtype=torch.long),
    }


def local_micro_batches(global_indices):
    """This data-parallel rank's share of the micro-batches (contiguous blocks, as Megatron)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_rank = len(global_indices) // dp_size
    return list(global_indices[dp_rank * per_rank : (dp_rank + 1) * per_rank])


def initial_weights(num_layers=2, num_experts=None, shared_expert=False):
    """Full weights of a freshly built model (expert init depends on EP, so load these)."""
    return full_named_tensors(build_gpt(num_layers=num_layers, num_experts=num_experts, shared_expert=shared_expert))


def ddp_gradients(global_indices, weights, num_experts=None, shared_expert=False, sequence_parallel=None):
    """One DDP forward/backward over this rank's micro-batches from ``weights``; reduced grads."""
    gpt = build_gpt(num_experts=num_experts, shared_expert=shared_expert, sequence_parallel=sequence_parallel)
    load_full_named_tensors(gpt, weights)
    model = wrap_with_ddp([gpt])
    indices = local_micro_batches(global_indices)
    losses = get_forward_backward_func()(
        forward_step_func=gpt_forward_step,
        data_iterator=iter([make_batch(i) for i in indices]),
        model=model,
        num_microbatches=len(indices),
        seq_length=SEQ,
        micro_batch_size=2,
        forward_only=False,
    )
    local_grads = {n: main_grad_or_grad(p).clone() for n, p in model[0].module.named_parameters()}
    return {
        "losses": [d["lm loss"] for d in losses],
        "local_grads": local_grads,
        "grads": full_named_tensors(model[0], main_grad_or_grad),
    }


def train_losses(steps, num_microbatches, weights, num_layers=2, num_experts=None, lr=1e-2):
    """``steps`` optimizer steps of AdamW with clipping from ``weights``; losses, final weights."""
    gpt = build_gpt(num_layers=num_layers, num_experts=num_experts)
    load_full_named_tensors(gpt, weights)
    model = wrap_with_ddp([gpt])
    # adam_eps well above fp32 reduction noise: with eps=1e-8 an element whose gradient is ~0
    # moves by +-lr on the sign of its rounding error, and layouts that sum in a different order
    # drift apart by lr in such elements. Elements with real gradients (~1e-3) are unaffected.
    optimizer = build_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.1, clip_grad=0.5, adam_eps=1e-5), model
    )
    dp_size = parallel_state.get_data_parallel_world_size()
    losses, norms = [], []
    global_indices = list(range(num_microbatches * dp_size))  # the same batch every step
    for _ in range(steps):
        result = train_step(
            model,
            optimizer,
            iter([make_batch(i) for i in local_micro_batches(global_indices)]),
            num_microbatches=num_microbatches,
            seq_length=SEQ,
            micro_batch_size=2,
        )
        assert result.update_successful
        losses.append(result.loss)
        norms.append(result.grad_norm)
    no_decay = sorted(
        name
        for name, p in model[0].module.named_parameters()
        for g in optimizer.param_groups
        if any(p is q for q in g["params"]) and g["weight_decay"] == 0.0
    )
    return {"losses": losses, "grad_norms": norms, "weights": full_named_tensors(model[0]), "no_decay": no_decay}


def save_checkpoint(ckpt_dir, num_experts=None):
    model = build_gpt(num_experts=num_experts)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return full_named_tensors(model)


def load_checkpoint(ckpt_dir, num_experts=None):
    model = build_gpt(seed=4321, num_experts=num_experts)  # different init, overwritten by the load
    before = full_named_tensors(model)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    return {"before": before, "after": full_named_tensors(model)}


def dropout_masks():
    """Dropout masks drawn from the default stream and from each tracker stream."""
    x = torch.ones(4096)
    masks = {"default": F.dropout(x, 0.5) > 0}
    for name in ("model-parallel-rng", "expert-parallel-rng", "data-parallel-rng"):
        with get_cuda_rng_tracker().fork(name):
            masks[name] = F.dropout(x, 0.5) > 0
    masks["default_after"] = F.dropout(x, 0.5) > 0
    return masks
