"""SGT cost is counted as computed: ``sgt/flops_overhead``'s analytic FLOPs equal FlopCounterMode on a
hybrid (full + sliding-window KV heads) GQA model with a loop over two kept query heads."""

from pathlib import Path

import torch

from megatron_ext.config import from_dict
from megatron_ext.parallel import ParallelSizes
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from tests.configs import SMALL, merge

CONFIG = merge(
    SMALL,
    {
        "data": {"seq_length": 256},
        "train": {"micro_batch_size": 2, "global_batch_size": 2},
        "hybrid_attention": {"enabled": True, "method": "rule_head", "window": 16, "target": 0.5},
        "looping": {"enabled": True},
    },
)


def measured_and_counted(run_dir):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_ext.run.builder import build_model
    from megatron_ext.sgt.flops import LoopedLayer, LoopStructure, forward_flops, loop_flops
    from megatron_ext.training.capabilities import restore_capabilities
    from megatron_ext.training.checkpoint import CommonState

    cfg = from_dict(RunConfig, CONFIG)
    (model,) = build_model(cfg, cuda=False)
    sgt = restore_capabilities(cfg, [model], CommonState(), Path(run_dir))["looping"]
    # Layer 2 loops once over query heads 0 (KV head 0: sliding window) and 3 (KV head 1: full).
    sgt.scheduler.load_state_dict(
        {
            "selected": [2],
            "depth": {2: 1},
            "kept": {2: [0, 3]},
            "selected_at": {2: 0},
            "window_end": 10**6,
            "frozen": False,
        }
    )
    step = 10**5  # long after the fade: the kept heads only
    sgt._apply_structure(step)
    tokens = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(256).expand(2, -1)
    model.eval()

    def flops():  # SDPA's math backend: FlopCounterMode has no formula for torch's CPU flash kernel
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(tokens, positions, attention_mask=None)
        return counter.get_total_flops()

    with_loop = flops()
    model.decoder.layers[2].set_loop(0)
    without = flops()
    structure = sgt.structure(step)
    naive = LoopStructure("sgt", {2: LoopedLayer(1, 2, 2)})  # every head full, both KV groups
    return {
        "measured_loop": with_loop - without,
        "measured_model": without,
        "counted_loop": loop_flops(sgt.flops_shape, structure),
        "counted_model": forward_flops(sgt.flops_shape, structure, loops=False),
        "naive_loop": loop_flops(sgt.flops_shape, naive),
        "structure": structure,
    }


def test_loop_flops_of_a_hybrid_layer_match_flop_counter_mode(tmp_path):
    out = run_distributed(measured_and_counted, 1, ParallelSizes(), run_dir=str(tmp_path))[0]
    print(
        f"[sgt flops] loop pass: FlopCounterMode {out['measured_loop']:,}, ours {out['counted_loop']:,} "
        f"(every head full T x T and both KV groups: {out['naive_loop']:,}); model without loops: "
        f"FlopCounterMode {out['measured_model']:,}, ours {out['counted_model']:,}"
    )
    assert out["structure"].layers[2].query_heads == 2 and out["structure"].layers[2].kv_heads == 2
    assert out["counted_loop"] == out["measured_loop"]
    assert out["counted_model"] == out["measured_model"]
    assert out["naive_loop"] > 1.2 * out["measured_loop"]
