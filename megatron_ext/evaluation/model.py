"""A trained run as the evaluations see it: one process, the checkpoint's weights with the structure
training left in them (hybrid allocation or gates, SGT loops; an elastic run optionally under a
sub-network), the run's tokenizer, and three operations: next-token logits of whole sequences,
per-token log-likelihoods, and greedy generation with the cached decoder.

Every evaluation (the lm-eval model, long-context retrieval, length extrapolation) goes through
:class:`EvalModel`, so they all score the model exactly as training left it. Needs Megatron's parallel
state at sizes 1 (:func:`~megatron_ext.parallel.state.parallel_job` with ``ParallelSizes()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EvalModel"]


@dataclass
class EvalModel:
    """A loaded run (see the module doc). ``max_length``: the training sequence length, the context
    the evaluations use by default (RoPE models accept longer inputs: length extrapolation)."""

    model: torch.nn.Module
    cfg: object
    run_dir: Path
    step: int
    tokenizer: Optional[object]
    hooks: Sequence
    device: torch.device
    subnetwork: Optional[object] = None

    @classmethod
    def load(cls, run_dir, step: Optional[int] = None, sub=None, overrides: Sequence[str] = ()) -> "EvalModel":
        """The latest (or ``step``'s) checkpoint of ``run_dir``, on one GPU when there is one; ``sub``
        (a :class:`~megatron_ext.moe.elastic.SubNetwork`) evaluates that sub-network of the full model."""
        from megatron_ext.inference.generate import run_tokenizer
        from megatron_ext.run.builder import unsharded
        from megatron_ext.run.schedule import trained_config
        from megatron_ext.training.capabilities import batch_hooks
        from megatron_ext.training.evaluate import apply_subnetwork, load_trained

        run_dir = Path(run_dir)
        cfg = unsharded(trained_config(run_dir, step, overrides))
        cuda = torch.cuda.is_available()
        (model,), _, common = load_trained(cfg, run_dir, step, cuda=cuda)
        if sub is not None:
            apply_subnetwork(cfg, [model], sub)
        model.eval()
        return cls(
            model=model,
            cfg=cfg,
            run_dir=run_dir,
            step=common.step,
            tokenizer=run_tokenizer(cfg, run_dir),
            hooks=list(batch_hooks(cfg)),
            device=torch.device("cuda") if cuda else torch.device("cpu"),
            subnetwork=sub,
        )

    @property
    def max_length(self) -> int:
        return self.cfg.data.seq_length

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (``model.vocab_size``); logits beyond it (Megatron pads the output
        layer to a multiple of 128) are dropped."""
        return self.cfg.model.vocab_size

    @property
    def eod(self) -> Optional[int]:
        return getattr(self.tokenizer, "eod", None)

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        """``[b, s]`` token ids -> ``[b, s, vocab]`` float32 next-token logits (the ordinary forward,
        capabilities' batch hooks first)."""
        tokens = tokens.to(self.device)
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        batch = {"tokens": tokens, "position_ids": positions, "modality_ids": torch.zeros_like(tokens)}
        for hook in self.hooks:
            hook(self.model, batch)
        logits = self.model(tokens, positions, attention_mask=None)
        return logits[..., : self.vocab_size].float()

    def token_logprobs(self, tokens: Tensor) -> Tensor:
        """``[b, s]`` -> ``[b, s - 1]``: log p(token ``i + 1`` | tokens ``..i``)."""
        log_probs = F.log_softmax(self.logits(tokens[:, :-1]), dim=-1)
        return log_probs.gather(-1, tokens[:, 1:].to(log_probs.device).unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def generate(self, prompt: List[int], max_new_tokens: int, stop: Sequence[int] = ()) -> List[int]:
        """Greedy continuation of ``prompt`` with the cached decoder (the structure's own caches),
        ending after a token of ``stop`` (kept) or ``max_new_tokens``."""
        from megatron_ext.inference.decode import Decoder

        decoder = Decoder(self.model, self.hooks)
        tokens = torch.tensor([prompt], device=self.device)
        caches = decoder.new_cache(1, len(prompt) + max_new_tokens)
        logits = decoder.prefill(tokens, caches, last_only=True)[:, -1, : self.vocab_size]
        out: List[int] = []
        for i in range(max_new_tokens):
            token = int(logits.argmax(dim=-1))
            out.append(token)
            if token in stop or i + 1 == max_new_tokens:
                break
            step = torch.tensor([token], device=self.device)
            logits = decoder.step(step, len(prompt) + i, caches)[:, : self.vocab_size]
        return out
