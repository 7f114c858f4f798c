"""Sampling loops: cached (:class:`~megatron_ext.inference.decode.Decoder`) and, as the reference,
full re-computation of the prefix at every step; and the run's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def sample(logits: Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> Tensor:
    """``[b, vocab]`` -> ``[b]``: greedy at temperature 0, else nucleus sampling (top-p) at ``temperature``."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def generate(
    decoder,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token: Optional[int] = None,
    capacity: Optional[int] = None,
) -> Tensor:
    """``[b, s]`` prompt -> ``[b, new]`` tokens, with a KV cache (stops early when every sequence
    produced ``stop_token``)."""
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    length = prompt.shape[1]
    caches = decoder.new_cache(prompt.shape[0], capacity or length + max_new_tokens)
    logits = decoder.prefill(prompt, caches, last_only=True)[:, -1]
    out: List[Tensor] = []
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_p, generator)
        out.append(token)
        if stop_token is not None:
            done |= token == stop_token
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits = decoder.step(token, length + i, caches)
    return torch.stack(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)


@torch.no_grad()
def generate_by_recomputation(model, prompt: Tensor, max_new_tokens: int, batch_hooks: Sequence = ()) -> Tensor:
    """Greedy tokens by the model's ordinary forward over the whole prefix at every step (the
    reference the cached decoder must reproduce)."""
    model.eval()
    tokens = prompt
    for _ in range(max_new_tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        batch = {
            "tokens": tokens,
            "position_ids": positions,
            "modality_ids": torch.zeros_like(tokens, dtype=torch.uint8),
        }
        for hook in batch_hooks:
            hook(model, batch)
        logits = model(tokens, positions, attention_mask=None)  # [b, s, vocab]
        tokens = torch.cat([tokens, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return tokens[:, prompt.shape[1] :]


def supported_positions(cfg) -> Tuple[int, str]:
    """The longest sequence (prompt and generated tokens) the model of run config ``cfg`` is meant for,
    and where that length comes from.

    Learned absolute positions: the rows of the position table (``model.max_position_embeddings``,
    default ``data.seq_length``); a position past them has no embedding. RoPE has no table, but it
    extrapolates only a little past the trained length (Press et al. 2022, "Train Short, Test Long"):
    attention at distances training never showed is out of distribution. So the same length is the
    limit: ``model.max_position_embeddings`` when set (HF's meaning: with ``model.rope_scaling`` it is
    the extended context), else, with a ``yarn`` or ``llama3`` scaling, ``factor`` x
    ``original_max_position_embeddings`` (the context the scaling extends to) when that exceeds
    ``data.seq_length``, else ``data.seq_length``, the length training ran at (a ``linear`` scaling
    was trained at it)."""
    m = cfg.model
    if m.max_position_embeddings is not None:
        return m.max_position_embeddings, "model.max_position_embeddings"
    scaling, original = m.rope_scaling, m.rope_scaling.original_max_position_embeddings
    extended = int(scaling.factor * original) if m.position_embedding == "rope" and original is not None else 0
    if extended > cfg.data.seq_length:
        return extended, f"model.rope_scaling: {scaling.type}, factor {scaling.factor:g} x {original}"
    return cfg.data.seq_length, "data.seq_length, the length the model was trained at"


def run_tokenizer(cfg, run_dir: Path):
    """The tokenizer a run's tokens came from, or None (synthetic data: prompts are token ids).

    In order: the HF tokenizer of an imported model (``RUN_DIR/tokenizer/``), ``data.tokenizer``
    (with ``data.eod_token``), the built-in corpus's tokenizer (``data.kind: default``); each loaded
    by :func:`~megatron_ext.data.tokenizers.load_tokenizer`, as preprocessing loaded it. Data
    preprocessed with ``bytes`` needs no ``data.tokenizer``: its manifest says so. A tokenizer that
    cannot be loaded raises ValueError naming where the run points to it."""
    from megatron_ext.data.tokenizers import ByteTokenizer, is_tokenizer_dir, load_tokenizer

    imported = Path(run_dir) / "tokenizer"
    if is_tokenizer_dir(imported):
        return _load(f"the imported model's tokenizer {imported}", str(imported))
    if cfg.data.tokenizer:
        where = f"data.tokenizer={cfg.data.tokenizer} (in {Path(run_dir) / 'config.yaml'})"
        return _load(where, cfg.data.tokenizer, cfg.data.eod_token)
    if cfg.data.kind == "default":
        from megatron_ext.data.default_corpus import ensure_default_corpus

        return load_tokenizer(str(Path(ensure_default_corpus(cfg.data.cache_dir)).parent / "tokenizer.json"))
    if cfg.data.kind == "indexed" and _recorded_tokenizer(cfg.data.paths) == ByteTokenizer.identity:
        return ByteTokenizer()  # the one tokenizer a manifest names without a file
    return None


def _load(where: str, spec: str, eod_token: Optional[str] = None):
    """:func:`~megatron_ext.data.tokenizers.load_tokenizer` of ``spec``; its failure (a corrupt or missing
    tokenizer) a ValueError that says ``where`` the run names it."""
    from megatron_ext.data.tokenizers import load_tokenizer

    try:
        return load_tokenizer(spec, eod_token)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise ValueError(f"{where}: {err}") from None


def _recorded_tokenizer(prefixes) -> Optional[str]:
    """The tokenizer identity the first prefix's manifest records (None: no manifest, or unreadable)."""
    import json

    try:
        manifest = json.loads(Path(f"{prefixes[0]}.manifest.json").read_text())
        return manifest["vocab"]["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
