"""``model_flops_per_token`` is what the model computes: the analytic count (core + each capability's
``adjust_cost``) equals FlopCounterMode on the real model, for a dense model, an MoE model in an
elastic sub-network (skipped layers, reduced top-k, shared expert, a dense first layer), a hybrid
(full + sliding-window KV heads) model with an SGT loop, ConSA during mask learning (both kernels),
and multi-token prediction. Training = 3 x forward, as FlopCounterMode measures it wherever no kernel
recomputes in its backward."""

from pathlib import Path

import pytest
import torch

from megatron_ext.config import from_dict
from megatron_ext.parallel import ParallelSizes
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from tests.configs import SMALL, merge

BASE = merge(SMALL, {"data": {"seq_length": 128}, "train": {"micro_batch_size": 2, "global_batch_size": 2}})
CASES = {
    "dense": {},
    "moe_elastic": {
        "moe": {
            "enabled": True,
            "num_experts": 4,
            "top_k": 2,
            "expert_ffn_hidden_size": 32,
            "shared_expert_ffn_hidden_size": 48,
            "first_k_dense": 1,
        },
        "elastic": {"enabled": True},
    },
    "hybrid_sgt": {
        "hybrid_attention": {"enabled": True, "method": "rule_head", "window": 16, "target": 0.5},
        "looping": {"enabled": True},
    },
    "consa_gated": {
        "hybrid_attention": {"enabled": True, "method": "consa", "window": 16, "target": 0.5, "mask_learning_steps": 10}
    },
    "mtp": {"model": {**BASE["model"], "mtp_num_layers": 1}},
}
STEP = 5  # the step whose cost is counted


def measured_and_counted(case, run_dir):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_ext.capability import TrainContext
    from megatron_ext.models.flops import ModelCost
    from megatron_ext.models.vocab import padded_vocab_size
    from megatron_ext.moe import elastic
    from megatron_ext.parallel.state import process_groups
    from megatron_ext.run.builder import build_model
    from megatron_ext.training.capabilities import restore_capabilities
    from megatron_ext.training.checkpoint import CommonState

    cfg = from_dict(RunConfig, {**BASE, **CASES[case]})
    (model,) = build_model(cfg, cuda=False)
    callbacks = restore_capabilities(cfg, [model], CommonState(step=STEP - 1), Path(run_dir))
    ctx = TrainContext(
        config=cfg, model=[model], optimizer=None, run_dir=Path(run_dir), pg_collection=process_groups(), step=STEP - 1
    )
    if "looping" in callbacks:  # layer 2 loops once over query heads 0 (a window KV head) and 3 (full)
        callbacks["looping"].scheduler.load_state_dict(
            {
                "selected": [2],
                "depth": {2: 1},
                "kept": {2: [0, 3]},
                "selected_at": {2: 0},
                "window_end": 0,
                "frozen": False,
            }
        )
    for cb in callbacks.values():
        cb.on_step_begin(ctx)
    if "looping" in callbacks:  # entropy tracking is measurement, not the model (left out, as recompute is)
        callbacks["looping"]._set_tracking(False)
    if "moe" in callbacks:  # the step's sub-network: layers 0 and 2, top-1, every expert
        moe = callbacks["moe"]
        moe.sub = elastic.SubNetwork(layers=(0, 2), experts=None, top_k=1)
        elastic.apply([model], moe.sub)
    tokens = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(128).expand(2, -1)

    def run(backward: bool) -> int:  # SDPA's math backend: FlopCounterMode counts 0 for the CPU flash kernel
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            with torch.set_grad_enabled(backward):
                loss = model(tokens, positions, attention_mask=None, labels=tokens)
            if backward:
                loss.float().sum().backward()
        return counter.get_total_flops()

    forward = run(backward=False)
    training = run(backward=True)
    ctx.step = STEP
    cost = ModelCost.from_config(cfg.model, cfg.data.seq_length, padded_vocab_size(cfg.model.vocab_size))
    for cb in callbacks.values():
        cb.adjust_cost(ctx, cost)
    tokens_per_step = tokens.numel()
    return {
        "forward": forward / tokens_per_step,
        "training": training / tokens_per_step,
        "counted_forward": cost.forward_flops_per_token(),
        "counted_training": cost.training_flops_per_token(),
        "dense": ModelCost.from_config(
            cfg.model, cfg.data.seq_length, padded_vocab_size(cfg.model.vocab_size)
        ).forward_flops_per_token(),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_model_flops_per_token_match_flop_counter_mode(case, tmp_path):
    out = run_distributed(measured_and_counted, 1, ParallelSizes(), case=case, run_dir=str(tmp_path))[0]
    print(
        f"[model flops] {case}: forward/token FlopCounterMode {out['forward']:,.1f}, ours "
        f"{out['counted_forward']:,.1f} (dense full-attention model {out['dense']:,.1f}); training/token "
        f"{out['training']:,.1f} vs {out['counted_training']:,.1f}"
    )
    assert out["counted_forward"] == pytest.approx(out["forward"], rel=1e-9)
    if "hybrid_attention" in CASES[case]:
        # The blocked sliding-window kernel recomputes its scores in the backward (as flash attention
        # does): hardware FLOPs above the model's 3 x forward, which MFU does not count.
        assert out["counted_training"] == pytest.approx(3 * out["forward"], rel=1e-9)
        assert out["training"] > out["counted_training"]
    else:
        assert out["counted_training"] == pytest.approx(out["training"], rel=1e-9)
    if case != "dense":  # each capability really changed the count
        assert abs(out["counted_forward"] - out["dense"]) > 0.02 * out["dense"]
