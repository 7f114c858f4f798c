"""Inference cost, measured side by side: KV-cache bytes, decode tokens/s and prefill time of the
static hybrid vs full attention, and of elastic sub-models vs the full MoE.

1. Hybrid attention (dense model d=256, 4 layers, 8 query / 4 KV heads of dim 32): full attention
   vs the KV-head-wise static hybrid at rho = 0.5, W = 512 (``rule_head``: half the KV heads of
   every layer SWA). KV-cache bytes at context T = 8192 (as allocated by the decoder; ideal ratio
   0.5 + 0.5 W / T), decode tokens/s at T (4 sequences, their caches filled to T positions, then
   single-token steps), prefill time of a 4096-token prompt (the training kernels).
2. SGT loops (the dense model): loops of depth 1 on 2 kept query heads (one KV group) in the 2
   deepest layers, as SGT grows them, vs the same model without loops. KV-cache bytes at T = 8192
   (ideal ratio 1 + 2 * (1/4) / 4: a loop pass caches its kept heads' KV group only), decode
   tokens/s at T, prefill time.
3. Elastic sub-models of an MoE (4 layers, 16 experts of width 256, top-4, a shared expert; the
   shapes ``pretrain.extract`` writes, random weights): top-k 25 %, half the experts, half the
   layers, vs the full MoE; decode tokens/s at context 1024 (4 sequences) and prefill of 512 tokens.

    python -m benchmarks.inference_bench [--reps 5]
"""

from __future__ import annotations

from typing import Dict, List

import torch

from benchmarks.common import command_line, interleaved, median, ratio, row, single_process_megatron

DENSE = dict(
    num_layers=4,
    hidden_size=256,
    num_attention_heads=8,
    num_query_groups=4,
    kv_channels=32,
    ffn_hidden_size=704,
    vocab_size=4096,
    qk_layernorm=True,
)
WINDOW, CONTEXT, PREFILL = 512, 8192, 4096
DECODE_BATCH = 4
"""Sequences decoded together: at batch 1 this tiny model's decode step is mostly per-op overhead."""
MOE_SHAPE = dict(DENSE, num_layers=4)
MOE = dict(enabled=True, num_experts=16, top_k=4, expert_ffn_hidden_size=256, shared_expert_ffn_hidden_size=256)
MOE_CONTEXT, MOE_PREFILL = 1024, 512
DECODE_STEPS = 16


def _config(model: dict, seq_length: int, **sections):
    from megatron_ext.config import from_dict
    from megatron_ext.run import RunConfig

    return from_dict(RunConfig, {"model": model, "data": {"seq_length": seq_length}, **sections})


def _decoder(cfg, structure=None):
    """The decoder of ``cfg``'s model (random weights); ``structure(model)`` sets what training would
    have grown (e.g. loops) before the decoder reads the layers."""
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from megatron_ext.inference.decode import Decoder
    from megatron_ext.run.builder import build_model
    from megatron_ext.training.capabilities import batch_hooks, restore_capabilities
    from megatron_ext.training.checkpoint import CommonState

    torch.manual_seed(0)
    (model,) = build_model(cfg, cuda=False)
    with TemporaryDirectory() as run_dir:
        restore_capabilities(cfg, [model], CommonState(), Path(run_dir))
    if structure is not None:
        structure(model)
    return Decoder(model.eval(), batch_hooks(cfg))


def _filled(decoder, context: int):
    """Caches holding ``context`` positions of random keys (decode cost does not depend on their values)."""
    caches = decoder.new_cache(DECODE_BATCH, context + DECODE_STEPS)
    gen = torch.Generator().manual_seed(0)
    for cache in caches.values():
        kv = torch.randn(context, DECODE_BATCH, cache.num_kv_heads, decoder.head_dim, generator=gen)
        cache.write(kv, kv, torch.arange(context))
    return caches


def _decode(decoder, context: int):
    caches = _filled(decoder, context)

    def steps():
        token = torch.zeros(DECODE_BATCH, dtype=torch.long)
        for i in range(DECODE_STEPS):
            token = decoder.step(token, context + i, caches).argmax(-1)

    return steps


def _prefill(decoder, length: int):
    prompt = torch.randint(0, 4096, (1, length), generator=torch.Generator().manual_seed(1))
    return lambda: decoder.prefill(prompt, decoder.new_cache(1, length))


def bench_hybrid(reps: int) -> List[dict]:
    full = _decoder(_config(DENSE, PREFILL))
    hybrid = _decoder(
        _config(
            DENSE, PREFILL, hybrid_attention={"enabled": True, "method": "rule_head", "window": WINDOW, "target": 0.5}
        )
    )
    bytes_full = full.cache_bytes(full.new_cache(1, CONTEXT))
    bytes_hybrid = hybrid.cache_bytes(hybrid.new_cache(1, CONTEXT))
    decode = interleaved({"full": _decode(full, CONTEXT), "hybrid": _decode(hybrid, CONTEXT)}, reps=reps)
    prefill = interleaved({"full": _prefill(full, PREFILL), "hybrid": _prefill(hybrid, PREFILL)}, reps=reps)
    tps = {name: DECODE_BATCH * DECODE_STEPS / median(decode, name) for name in decode}
    name = f"hybrid rho 0.5 W {WINDOW} vs full"
    return [
        row(
            "inference",
            f"{name}: KV-cache bytes ratio at T {CONTEXT}",
            bytes_hybrid / bytes_full,
            f"<= {1.05 * (0.5 + 0.5 * WINDOW / CONTEXT):.4f}",
            ideal=0.5 + 0.5 * WINDOW / CONTEXT,
        ),
        row(
            "inference",
            f"{name}: decode tokens/s ratio at T {CONTEXT}",
            1.0 / ratio(decode, "hybrid", "full"),
            "report",
        ),
        row("inference", f"full: decode tokens/s at T {CONTEXT}", tps["full"], "report"),
        row("inference", f"{name}: prefill time ratio, {PREFILL} tokens", ratio(prefill, "hybrid", "full"), "report"),
        row("inference", f"full: prefill seconds, {PREFILL} tokens", median(prefill, "full"), "report"),
        row("inference", f"full: KV-cache MiB per sequence at T {CONTEXT}", bytes_full / 2**20, "report"),
    ]


LOOPED_LAYERS, KEPT_HEADS = (2, 3), (0, 1)


def bench_loops(reps: int) -> List[dict]:
    def grow_loops(model):
        for index in LOOPED_LAYERS:
            layer = model.decoder.layers[index]
            layer.set_loop(1)
            layer.set_head_factors([1.0 if head in KEPT_HEADS else 0.0 for head in range(DENSE["num_attention_heads"])])

    plain = _decoder(_config(DENSE, PREFILL))
    looped = _decoder(_config(DENSE, PREFILL, looping={"enabled": True}), grow_loops)
    bytes_plain = plain.cache_bytes(plain.new_cache(1, CONTEXT))
    bytes_looped = looped.cache_bytes(looped.new_cache(1, CONTEXT))
    decode = interleaved({"plain": _decode(plain, CONTEXT), "looped": _decode(looped, CONTEXT)}, reps=reps)
    prefill = interleaved({"plain": _prefill(plain, PREFILL), "looped": _prefill(looped, PREFILL)}, reps=reps)
    groups = DENSE["num_query_groups"]
    ideal = 1 + len(LOOPED_LAYERS) * (1 / groups) / DENSE["num_layers"]
    name = f"SGT loops on {len(KEPT_HEADS)} heads in {len(LOOPED_LAYERS)} layers vs none"
    return [
        row(
            "inference",
            f"{name}: KV-cache bytes ratio at T {CONTEXT}",
            bytes_looped / bytes_plain,
            f"<= {1.001 * ideal:.4f}",
            ideal=ideal,
        ),
        row(
            "inference",
            f"{name}: decode tokens/s ratio at T {CONTEXT}",
            1.0 / ratio(decode, "looped", "plain"),
            "report",
        ),
        row("inference", f"{name}: prefill time ratio, {PREFILL} tokens", ratio(prefill, "looped", "plain"), "report"),
    ]


def moe_submodels() -> Dict[str, dict]:
    """name -> (model, moe) sections of the full MoE and its extracted sub-models."""
    return {
        "full": (MOE_SHAPE, MOE),
        "top-k 25%": (MOE_SHAPE, dict(MOE, top_k=1)),
        "half experts": (MOE_SHAPE, dict(MOE, num_experts=8)),
        "half layers": (dict(MOE_SHAPE, num_layers=2), MOE),
    }


def bench_elastic(reps: int) -> List[dict]:
    decoders = {
        name: _decoder(_config(model, MOE_PREFILL, moe=moe, routing={"expert_bias": False}))
        for name, (model, moe) in moe_submodels().items()
    }
    decode = interleaved({name: _decode(d, MOE_CONTEXT) for name, d in decoders.items()}, reps=reps)
    prefill = interleaved({name: _prefill(d, MOE_PREFILL) for name, d in decoders.items()}, reps=reps)
    rows = [
        row(
            "inference",
            f"MoE full: decode tokens/s at T {MOE_CONTEXT}",
            DECODE_BATCH * DECODE_STEPS / median(decode, "full"),
            "report",
        )
    ]
    for name, d in decoders.items():
        if name == "full":
            continue
        rows += [
            row(
                "inference",
                f"MoE {name} vs full: decode tokens/s ratio at T {MOE_CONTEXT}",
                1.0 / ratio(decode, name, "full"),
                "report",
            ),
            row(
                "inference",
                f"MoE {name} vs full: prefill time ratio, {MOE_PREFILL} tokens",
                ratio(prefill, name, "full"),
                "report",
            ),
            row(
                "inference",
                f"MoE {name} vs full: KV-cache bytes ratio",
                d.cache_bytes(d.new_cache(1, MOE_CONTEXT))
                / decoders["full"].cache_bytes(decoders["full"].new_cache(1, MOE_CONTEXT)),
                "report",
            ),
        ]
    return rows


def bench_cpu_mode(reps: int) -> List[dict]:
    """Cached decode steps (batch 1, context 1024, the dense model) with the CPU mode's per-op
    dispatch and without it (``cuda_redirect_suspended``, what the decoder does), the same tokens
    asserted; CPU only."""
    import contextlib

    import megatron_ext.compat.cpu as cpu

    if not cpu.cpu_support_active():
        return []
    decoder, suspended, context = _decoder(_config(DENSE, 1024)), cpu.cuda_redirect_suspended, 1024

    def steps(suspend: bool):
        def decode():
            cpu.cuda_redirect_suspended = suspended if suspend else contextlib.nullcontext
            try:
                caches = decoder.new_cache(1, context + 64)
                token, out = torch.zeros(1, dtype=torch.long), []
                for i in range(64):
                    token = decoder.step(token, i, caches).argmax(-1)
                    out.append(int(token))
                return out
            finally:
                cpu.cuda_redirect_suspended = suspended

        return decode

    assert steps(True)() == steps(False)(), "the CPU mode changed the greedy tokens"
    times = interleaved({"without": steps(True), "with": steps(False)}, reps)
    return [
        row(
            "cpu mode",
            "decode time with the mode / without (batch 1, 64 steps)",
            ratio(times, "with", "without"),
            "report",
        )
    ]


def run(reps: int = 5) -> List[dict]:
    single_process_megatron()
    return bench_hybrid(reps) + bench_loops(reps) + bench_elastic(reps) + bench_cpu_mode(reps)


if __name__ == "__main__":
    command_line(run, __doc__)
