"""Sampling from a trained run vs what a user would run instead: HF transformers' ``generate`` on the
run's export (``pretrain.hf export``).

For each model (full attention; a layer-wise hybrid, which HF runs with its stock Qwen3 class and
``layer_types``; a KV-head-wise hybrid, which HF runs with the exported remote code), a run of one
training step is written, exported to HF and loaded by ``transformers``. Then the same prompt (batch 1,
1024 random token ids) is decoded greedily for 256 new tokens both ways: our ``generate`` (the cached
:class:`~megatron_ext.inference.decode.Decoder`, as ``pretrain.generate`` calls it) and HF
``model.generate`` (its default dynamic cache; no end-of-sequence stop on either side). The two
token sequences must be equal, or the benchmark stops.

Times: each side generates 256 tokens (prefill + 255 cached steps) and, as its prefill, 1 token;
decode tokens/s = 255 / (median time of 256 - median time of 1). Cases alternate within each
repetition. HF runs outside the project's CPU mode (``cuda_redirect_suspended``), as it would in a
process of its own. KV bytes: ours as the decoder allocates them for 1280 positions; HF's as its
cache holds them after the 256 tokens.

    python -m benchmarks.decode_hf_bench [--reps 5]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List

import torch

from benchmarks.common import command_line, interleaved, median, row, single_process_megatron
from benchmarks.inference_bench import DENSE as MODEL  # d = 256, 4 layers, 8 query / 4 KV heads of dim 32

PROMPT, NEW_TOKENS, WINDOW = 1024, 256, 512
HYBRID = dict(enabled=True, window=WINDOW, target=0.5)
MODELS = {  # name -> hybrid_attention section (None: full attention)
    "full attention": None,
    f"layer-wise hybrid rho 0.5 W {WINDOW}": dict(HYBRID, method="rule_layer", granularity="layer"),
    f"KV-head hybrid rho 0.5 W {WINDOW} (HF remote code)": dict(HYBRID, method="rule_head", granularity="kv_head"),
}


def _trained_run(run_dir: Path, hybrid) -> None:
    """A run of one optimizer step (weights as initialised, then one update) with its checkpoint."""
    from megatron_ext.config import from_dict
    from megatron_ext.run import RunConfig
    from megatron_ext.training.loop import Trainer

    sections = {
        "model": MODEL,
        "data": {"seq_length": PROMPT + NEW_TOKENS},
        "train": {"micro_batch_size": 1, "global_batch_size": 1, "steps": 1, "lr": 1.0e-3, "warmup_steps": 0},
        "checkpoint": {"save_at_end": True},
        "logging": {"tensorboard": False},
    }
    if hybrid is not None:
        sections["hybrid_attention"] = hybrid
    Trainer(from_dict(RunConfig, sections), run_dir, log=lambda line: None).run()


def _hf_cache_bytes(cache) -> int:
    """Bytes of the key and value tensors an HF cache holds (``transformers`` 5: one entry per layer)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def bench_model(name: str, hybrid, work: Path, reps: int) -> List[dict]:
    import transformers

    from megatron_ext.compat.cpu import cuda_redirect_suspended
    from megatron_ext.inference.decode import Decoder
    from megatron_ext.inference.generate import generate
    from megatron_ext.parallel.state import destroy_parallel_state
    from megatron_ext.run.schedule import trained_config
    from megatron_ext.training.capabilities import batch_hooks
    from megatron_ext.training.evaluate import load_trained
    from megatron_ext.training.hf import export_hf

    run_dir = work / "run"
    _trained_run(run_dir, hybrid)  # its own parallel state, destroyed at its end
    single_process_megatron()
    hf_dir = export_hf(run_dir, work / "hf")
    remote = (hf_dir / "modeling_hybrid.py").is_file()
    cfg = trained_config(run_dir, None)
    (model,), _, _ = load_trained(cfg, run_dir, None)
    decoder = Decoder(model, batch_hooks(cfg))
    with cuda_redirect_suspended():
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=remote).eval()
    prompt = torch.randint(0, MODEL["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(0))

    def ours(new: int):
        return lambda: generate(decoder, prompt, new)

    def theirs(new: int, **kwargs):
        config = transformers.GenerationConfig(
            max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs
        )

        def call():
            with torch.no_grad(), cuda_redirect_suspended():
                return hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)

        return call

    tokens = ours(NEW_TOKENS)()
    out = theirs(NEW_TOKENS, return_dict_in_generate=True)()
    hf_tokens = out.sequences[:, PROMPT:]
    if not torch.equal(tokens, hf_tokens):
        first = int((tokens != hf_tokens).nonzero()[0, 1])
        raise AssertionError(f"{name}: our greedy tokens differ from HF generate's from new token {first}")
    ours_bytes = decoder.cache_bytes(decoder.new_cache(1, PROMPT + NEW_TOKENS))
    hf_bytes = _hf_cache_bytes(out.past_key_values)

    times = interleaved(
        {"ours": ours(NEW_TOKENS), "ours prefill": ours(1), "hf": theirs(NEW_TOKENS), "hf prefill": theirs(1)}, reps
    )
    decode = {side: median(times, side) - median(times, f"{side} prefill") for side in ("ours", "hf")}
    destroy_parallel_state()
    steps = NEW_TOKENS - 1
    return [
        row(
            "decode vs HF",
            f"{name}: decode tokens/s ours / HF generate (batch 1, prompt {PROMPT}, {NEW_TOKENS} new)",
            decode["hf"] / decode["ours"],
            ">= 1.0",
        ),
        row("decode vs HF", f"{name}: ours decode tokens/s", steps / decode["ours"], "report"),
        row(
            "decode vs HF",
            f"{name}: prefill time ours / HF, {PROMPT} tokens",
            median(times, "ours prefill") / median(times, "hf prefill"),
            "report",
        ),
        row(
            "decode vs HF",
            f"{name}: KV bytes ours / HF at {PROMPT + NEW_TOKENS} positions",
            ours_bytes / hf_bytes,
            "report",
        ),
    ]


def run(reps: int = 5) -> List[dict]:
    from megatron_ext.parallel.state import destroy_parallel_state

    destroy_parallel_state()  # each training run sets up its own (another benchmark may have left one)
    rows = []
    for name, hybrid in MODELS.items():
        with tempfile.TemporaryDirectory() as work:
            rows += bench_model(name, hybrid, Path(work), reps)
    return rows


if __name__ == "__main__":
    command_line(run, __doc__)
