"""This project's trained runs as an lm-eval model (EleutherAI's ``lm_eval``; ``pip install .[eval]``).

``megatron-ext`` is registered with lm-eval's model registry, so both its Python API and its command
line take it::

    lm_eval --model megatron-ext --model_args run_dir=runs/NAME,step=1000 --tasks arc_easy
    lm_eval --model megatron-ext --model_args run_dir=runs/NAME,layers=0-11,experts=0-31,top_k=4 ...

(``python -m pretrain.evaluate --run-dir R --tasks ...`` is the project's own front end, with the
project's local tasks included.) The run is loaded as :class:`~megatron_ext.evaluation.model.EvalModel`
loads it: the checkpoint's weights with the structure training left in them (hybrid allocation or
gates, SGT loops; MTP heads unused), optionally under an elastic sub-network.

The requests follow lm-eval's ``TemplateLM`` exactly as its ``hf`` model does, so that both score the
same tokens: a context's trailing spaces move to the continuation, the pair is encoded whole and
split at the context's length, an empty context is the end-of-text token, and input longer than
``max_length`` keeps its last tokens. ``loglikelihood_rolling`` scores a whole text in disjoint
windows of ``max_length`` (lm-eval's rolling windows); ``generate_until`` decodes greedily with the
cached decoder and cuts the text at the first stop sequence. One process: the CPU or one GPU;
requests of equal length are scored as one batch.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_ext.evaluation.model import EvalModel
from megatron_ext.training.extract import subnetwork_of

__all__ = ["MegatronExtLM"]


@register_model("megatron-ext")
class MegatronExtLM(TemplateLM):
    """lm-eval model over a run directory (see the module doc). ``model``: an already loaded
    :class:`EvalModel` (the Python API), else ``run_dir`` (and ``step``, ``layers``, ``experts``,
    ``top_k``) is loaded; ``max_length`` defaults to the training sequence length."""

    def __init__(
        self,
        run_dir: Optional[str] = None,
        step: Optional[int] = None,
        layers: Optional[str] = None,
        experts: Optional[str] = None,
        top_k: Optional[int] = None,
        max_length: Optional[int] = None,
        batch_size: int = 8,
        max_gen_toks: int = 256,
        model: Optional[EvalModel] = None,
        **kwargs,
    ):
        super().__init__()
        if model is None:
            if run_dir is None:
                raise ValueError("megatron-ext needs run_dir=RUN_DIR (a run directory with checkpoints)")
            model = _load(run_dir, step, layers, experts, top_k)
        if model.tokenizer is None:
            raise ValueError(
                f"{model.run_dir}: the run's data ({model.cfg.data.kind}) has no text tokenizer, so text "
                "tasks cannot be encoded; evaluate a run trained on tokenized text"
            )
        if model.eod is None:
            raise ValueError(f"{model.run_dir}: the run's tokenizer has no end-of-text token (set data.eod_token)")
        self.eval_model = model
        self._max_length = int(max_length or model.max_length)
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # -- what TemplateLM asks ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.eval_model.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return list(self.eval_model.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.eval_model.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None) -> List[Tuple[float, bool]]:
        """``[(key, context ids, continuation ids)]`` -> ``[(log p(continuation | context), greedy?)]``."""
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        inputs = []
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {index}: the continuation encodes to no tokens")
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            inputs.append((index, whole, len(continuation)))
        by_length = {}
        for item in inputs:  # equal lengths batch without padding
            by_length.setdefault(len(item[1]), []).append(item)
        for items in by_length.values():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                tokens = torch.tensor([whole for _, whole, _ in chunk])
                log_probs = F.log_softmax(self.eval_model.logits(tokens[:, :-1]), dim=-1)  # [b, s - 1, V]
                for row, (index, whole, count) in enumerate(chunk):
                    target = tokens[row, -count:].to(log_probs.device)
                    scores = log_probs[row, -count:]  # the positions that predict the continuation
                    picked = scores.gather(-1, target[:, None]).squeeze(-1)
                    greedy = bool((scores.argmax(dim=-1) == target).all())
                    results[index] = (float(picked.sum()), greedy)
                    self._cache(requests[index][0], results[index])
        return results

    def _cache(self, key, result) -> None:
        if key is not None:
            self.cache_hook.add_partial("loglikelihood", key, result)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        totals = []
        for (text,) in [request.args for request in requests]:
            windows = [
                (None,) + make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(score for score, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        outputs = []
        eos = self.tok_decode([self.eot_token_id])
        for context, gen_kwargs in [request.args for request in requests]:
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError(f"megatron-ext decodes greedily; got generation kwargs {gen_kwargs}")
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            text = self.tok_decode(self.eval_model.generate(prompt, max_new, stop=[self.eot_token_id]))
            cut = min([text.find(stop) for stop in until if stop and stop in text], default=len(text))
            outputs.append(text[:cut])
            self.cache_hook.add_partial("generate_until", (context, dict(until=until)), text[:cut])
        return outputs


def _load(run_dir, step, layers, experts, top_k) -> EvalModel:
    """A run directory's checkpoint as an :class:`EvalModel`, in a one-process parallel state that
    stays initialised for the model's life (lm-eval's command line builds the model itself)."""
    from megatron.core import parallel_state

    from megatron_ext.run.builder import unsharded
    from megatron_ext.run.schedule import trained_config

    if not parallel_state.model_parallel_is_initialized():
        from megatron_ext.parallel import ParallelSizes
        from megatron_ext.parallel.state import parallel_job

        job = parallel_job(ParallelSizes())
        job.__enter__()  # released at exit: the process ends with the evaluation
    cfg = unsharded(trained_config(run_dir, None if step is None else int(step)))
    sub = subnetwork_of(cfg, layers, experts, top_k)
    return EvalModel.load(run_dir, None if step is None else int(step), sub)
