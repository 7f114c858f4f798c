"""Smoke run: a tiny GPT with MoE trained for a few steps on synthetic tokens (TP=2, EP=2).

    torchrun --standalone --nproc_per_node 2 -m pretrain.smoke

The synthetic stream concatenates motifs drawn from a fixed set of 32 eight-token motifs, so
within a motif the next token is predictable and a working model's loss falls quickly.
"""

import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ext.compat import enable_cpu_support
from megatron_ext.models.layer_spec import decoder_block_spec, gpt_layer_spec
from megatron_ext.optim import build_optimizer
from megatron_ext.parallel import ParallelSizes, destroy_parallel_state, initialize_parallel_state
from megatron_ext.training.ddp import wrap_with_ddp
from megatron_ext.training.step import train_step

VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES, STEPS = 256, 64, 4, 2, 40
MOTIFS = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0)).view(32, 8)


def synthetic_batch(step: int, micro: int):
    g = torch.Generator().manual_seed(step * 1000 + micro)
    choice = torch.randint(0, len(MOTIFS), (MICRO_BATCH, SEQ // 8 + 1), generator=g)
    tokens = MOTIFS[choice].reshape(MICRO_BATCH, -1)[:, : SEQ + 1]
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(MICRO_BATCH, SEQ),
        "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous(),
    }


def main():
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    cpu = enable_cpu_support()
    dist.init_process_group("gloo" if cpu else "nccl")
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    initialize_parallel_state(ParallelSizes(tp=2, ep=2, etp=1), seed=1234)
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none",
        tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1,
        sequence_parallel=True,
        use_cpu_initialization=True, params_dtype=torch.float32,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=decoder_block_spec(config, [gpt_layer_spec(num_experts=4)] * 2),
        vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
    )
    model = wrap_with_ddp([model])
    optimizer = build_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.01), model)
    rank0 = dist.get_rank() == 0
    start = time.perf_counter()
    dp_rank = parallel_state.get_data_parallel_rank()
    for step in range(STEPS):
        batches = iter([synthetic_batch(step, dp_rank * MICRO_BATCHES + m) for m in range(MICRO_BATCHES)])
        result = train_step(model, optimizer, batches, num_microbatches=MICRO_BATCHES,
                            seq_length=SEQ, micro_batch_size=MICRO_BATCH)
        if rank0 and (step % 5 == 0 or step == STEPS - 1):
            print(f"step {step:3d}  loss {result.loss:.4f}  grad_norm {result.grad_norm:.3f}  "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
    destroy_parallel_state()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
