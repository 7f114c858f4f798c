"""Sample a continuation from a trained run, with a KV cache.

    python -m pretrain.generate --run-dir runs/NAME [--step N] --prompt "def main(" \\
        [--max-new-tokens 64] [--temperature 0.7] [--top-p 0.9] [--seed 0]

The model is loaded with the structure training left in it (the hybrid allocation, SGT loops; an
elastic run decodes its full network, an extracted sub-model its own), the run's tokenizer encodes
the prompt (``--prompt-file`` reads it from a file; ``--prompt-ids "1 2 3"`` gives token ids, for
runs on synthetic data), and the continuation is printed. Temperature 0 is greedy decoding. Full-
attention KV heads cache every position, sliding-window heads a ring buffer of their window; SGT
loop passes have caches of their own. One process: the CPU, or one GPU when there is one.

The prompt and the new tokens must fit the positions the model supports (``model.max_position_embeddings``,
else the trained ``data.seq_length``, or the context a RoPE scaling extends to: see
:func:`megatron_ext.inference.generate.supported_positions`); a longer request, like a KV cache larger
than the machine's memory or a tokenizer that cannot be loaded, is refused before the model loads.
"""

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_ext.config import ConfigError
from megatron_ext.parallel import ParallelSizes
from megatron_ext.parallel.state import parallel_job


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    prompt.add_argument("--prompt-ids", help="prompt as space-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        problems.append(f"--temperature={args.temperature} must be >= 0 (0: greedy)")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p={args.top_p} must be in (0, 1]")
    if not (args.run_dir / "config.yaml").is_file():
        problems.append(f"--run-dir {args.run_dir} has no config.yaml: give a run directory")
    if args.prompt_file is not None and not args.prompt_file.is_file():
        problems.append(f"--prompt-file {args.prompt_file} does not exist")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2

    from megatron_ext.inference.decode import Decoder
    from megatron_ext.inference.generate import generate, run_tokenizer
    from megatron_ext.run.builder import unsharded
    from megatron_ext.run.schedule import trained_config
    from megatron_ext.training.capabilities import batch_hooks
    from megatron_ext.training.evaluate import load_trained

    cuda = torch.cuda.is_available()
    try:  # everything that can be refused without the model: before the process group and the load
        cfg = unsharded(trained_config(args.run_dir, args.step))
        tokenizer = run_tokenizer(cfg, args.run_dir)
        if args.prompt_ids is not None:
            if not all(x.isdigit() for x in args.prompt_ids.split()):
                raise ValueError(f"--prompt-ids {args.prompt_ids!r}: give space-separated token ids (integers)")
            ids = [int(x) for x in args.prompt_ids.split()]
        elif tokenizer is None:
            raise ValueError(f"the run's data ({cfg.data.kind}) has no text tokenizer: give --prompt-ids")
        else:
            ids = tokenizer.encode(args.prompt if args.prompt is not None else args.prompt_file.read_text())
        if not ids or any(not 0 <= i < cfg.model.vocab_size for i in ids):
            raise ValueError(f"the prompt must be 1 or more token ids in [0, {cfg.model.vocab_size})")
        problems = [
            positions_problem(cfg, len(ids), args.max_new_tokens),
            kv_cache_problem(cfg, len(ids), args.max_new_tokens, cuda),
        ]
        if any(problems):
            raise ValueError("; ".join(p for p in problems if p))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with parallel_job(ParallelSizes()):
        try:
            (model,), _, _ = load_trained(cfg, args.run_dir, args.step, cuda=cuda)
            prompt_tensor = torch.tensor([ids], device=torch.device("cuda") if cuda else torch.device("cpu"))
            start = time.perf_counter()
            out = generate(
                Decoder(model, batch_hooks(cfg)),
                prompt_tensor,
                args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                stop_token=getattr(tokenizer, "eod", None),
            )[0].tolist()
        except (ConfigError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    seconds = time.perf_counter() - start
    print(tokenizer.decode(out) if tokenizer is not None and args.prompt_ids is None else " ".join(map(str, out)))
    print(
        f"[{len(ids)} prompt tokens, {len(out)} new tokens in {seconds:.2f} s: {len(out) / max(seconds, 1e-9):.1f} "
        "tokens/s including the prefill]",
        file=sys.stderr,
    )
    return 0


def positions_problem(cfg, prompt_tokens: int, new_tokens: int) -> Optional[str]:
    """Why a prompt and continuation are longer than the positions the model supports, or None
    (:func:`~megatron_ext.inference.generate.supported_positions`: learned positions end there; RoPE
    would decode at distances training never showed). Checked before the model is loaded."""
    from megatron_ext.inference.generate import supported_positions

    limit, source = supported_positions(cfg)
    if prompt_tokens + new_tokens <= limit:
        return None
    if prompt_tokens >= limit:
        what = f"the prompt's {prompt_tokens} tokens leave no room in the {limit} positions"
        fix = f"give a prompt of fewer than {limit} tokens"
    else:
        what = f"prompt + new tokens = {prompt_tokens} + {new_tokens} exceed the {limit} positions"
        fix = f"ask for --max-new-tokens <= {limit - prompt_tokens} or shorten the prompt"
    extend = (
        "; to generate longer, extend the context with model.rope_scaling (e.g. yarn) and "
        "model.max_position_embeddings in the run's config.yaml"
        if cfg.model.position_embedding == "rope"
        else " (learned positions have no embedding past them)"
    )
    return f"{what} of this model ({source}): {fix}{extend}"


def kv_cache_problem(cfg, prompt_tokens: int, new_tokens: int, cuda: bool) -> Optional[str]:
    """Why a generation's KV cache (keys and values of every layer for every position) would not fit
    in this machine's memory (GPU memory on GPU), or None. Checked before the model is loaded."""
    from megatron_ext.run.builder import params_dtype

    m = cfg.model
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    positions = prompt_tokens + new_tokens
    element = torch.finfo(params_dtype(cfg, cuda)).bits // 8
    cache = 2 * m.num_layers * groups * head_dim * positions * element
    memory = torch.cuda.mem_get_info()[1] if cuda else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if cache <= memory:
        return None
    return (
        f"--max-new-tokens={new_tokens}: {positions:,} positions need a KV cache of {cache / 2**30:,.1f} GiB, more "
        f"than the {memory / 2**30:,.1f} GiB of {'GPU ' if cuda else ''}memory here: ask for fewer new tokens"
    )


if __name__ == "__main__":
    sys.exit(main())
