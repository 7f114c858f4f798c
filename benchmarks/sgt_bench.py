"""SGT cost, measured side by side: step time (forward + backward) of vanilla, SGT and block
looping on the same model, and the analytical FLOPs overhead (checked against
torch.utils.flop_counter in tests/unit/test_sgt_flops.py).

    python -m benchmarks.sgt_bench [--reps 5]

Model: a CPU-sized GPT (d=512, 16 layers, 16 heads of 32, SwiGLU FFN 1408, T=1024, batch 1).
SGT: 3 layers looped once, 2 of 16 heads kept (their fade finished, so only the kept heads' Q/K/V/O
slices run). Block loop: the same 3 layers re-run whole.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from benchmarks.common import command_line, interleaved, median, ratio, row, single_process_megatron

SHAPE = dict(num_layers=16, hidden_size=512, num_attention_heads=16, ffn_hidden_size=1408, vocab_size=8192)
SEQ, LOOPED, KEPT = 1024, (15, 12, 9), (0, 1)


def _build():
    from megatron_ext.config import from_dict
    from megatron_ext.run import RunConfig
    from megatron_ext.run.builder import build_model

    single_process_megatron()
    cfg = from_dict(
        RunConfig,
        {"model": SHAPE, "data": {"seq_length": SEQ}, "looping": {"enabled": True, "num_keep_heads": len(KEPT)}},
    )
    (model,) = build_model(cfg, cuda=False)
    return cfg, model


def _set_structure(model, method: str) -> None:
    from megatron_ext.sgt.looped_layer import LoopedTransformerLayer

    for layer in model.modules():
        if isinstance(layer, LoopedTransformerLayer):
            looped = method != "vanilla" and layer.layer_index in LOOPED
            layer.set_loop(1 if looped else 0, "block" if method == "block" else "sgt")
            layer.set_head_factors([1.0 if h in KEPT else 0.0 for h in range(SHAPE["num_attention_heads"])])


def _step(model, method: str, tokens: torch.Tensor) -> None:
    """One forward + backward of ``model`` looping as ``method``."""
    _set_structure(model, method)
    positions = torch.arange(SEQ).unsqueeze(0)
    model(tokens, positions, None, labels=tokens).float().mean().backward()
    model.zero_grad(set_to_none=True)


def run(reps: int = 5) -> List[Dict[str, object]]:
    from megatron_ext.models.vocab import padded_vocab_size
    from megatron_ext.sgt.flops import GPTShape, LoopedLayer, LoopStructure, flops_overhead

    cfg, model = _build()
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, SEQ))
    times = interleaved({m: (lambda m: lambda: _step(model, m, tokens))(m) for m in ("vanilla", "sgt", "block")}, reps)
    shape = GPTShape.from_run_config(cfg, padded_vocab_size(SHAPE["vocab_size"]))
    sgt = LoopStructure("sgt", {i: LoopedLayer(1, len(KEPT), len(KEPT)) for i in LOOPED})
    block = LoopStructure("block", {i: LoopedLayer(1, 16, 16) for i in LOOPED})
    released = GPTShape(
        hidden_size=1024,
        num_layers=16,
        num_heads=16,
        num_kv_heads=16,
        head_dim=64,
        ffn_hidden_size=4096,
        vocab_size=50304,
        seq_length=4096,
    )
    return [
        row("sgt", "step time SGT / vanilla", ratio(times, "sgt", "vanilla"), "<= 1.02"),
        row("sgt", "step time block loop / vanilla", ratio(times, "block", "vanilla"), "reference"),
        row("sgt", "FLOPs overhead SGT (this model)", flops_overhead(shape, sgt), "<= 0.03"),
        row("sgt", "FLOPs overhead block loop (this model)", flops_overhead(shape, block), "reference"),
        row("sgt", "FLOPs overhead SGT (released 300M shape, T=4096)", flops_overhead(released, sgt), "<= 0.03"),
        row("sgt", "FLOPs overhead block loop (released 300M shape, T=4096)", flops_overhead(released, block), "~0.19"),
        row("sgt", "vanilla step time (s, median)", median(times, "vanilla"), "report"),
    ]


if __name__ == "__main__":
    command_line(run, __doc__)
