"""Build the train / validation datasets a run's ``data`` section asks for (call on every rank)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch.distributed as dist

from megatron_ext.data.synthetic import CopyTaskDataset, SyntheticMotifDataset

if TYPE_CHECKING:
    from megatron_ext.run.config import RunConfig


def build_datasets(
    cfg: RunConfig, train_samples: Optional[int] = None, valid_samples: Optional[int] = None
) -> Tuple[object, object]:
    """(train, valid): indexable datasets whose samples follow the batch contract. ``train_samples``: how
    many training samples the run reads (None: ``train.steps`` global batches; a run with a ramp-up or
    stages gives its schedule's count, :meth:`~megatron_ext.run.schedule.RunSchedule.stage_samples`).
    ``valid_samples``: validation samples an evaluation outside the run reads; the validation set is
    sized for the larger of it and the run's evaluations (below the run's, the same samples as the run)."""
    from megatron_ext.compat.safe_load import enable_safe_loading

    enable_safe_loading()  # Megatron's cached sample indices are read without unpickling
    d, t = cfg.data, cfg.train
    if d.kind in ("synthetic", "copy"):
        cls = SyntheticMotifDataset if d.kind == "synthetic" else CopyTaskDataset
        return (
            cls(cfg.model.vocab_size, d.seq_length, d.seed, "train"),
            cls(cfg.model.vocab_size, d.seq_length, d.seed, "valid"),
        )
    from megatron_ext.data.gpt_dataset import DOCUMENT_FLAGS, build_gpt_datasets
    from megatron_ext.data.tokenizers import load_tokenizer

    prefixes = list(d.paths)
    if d.kind == "default":
        from megatron_ext.data.default_corpus import ensure_default_corpus

        if dist.get_rank() == 0:  # one rank builds the cache, the others wait for it
            ensure_default_corpus(d.cache_dir)
        dist.barrier()
        prefixes = [ensure_default_corpus(d.cache_dir)]
    # At least one evaluation's samples: a capability may evaluate outside the periodic evaluations
    # (TrainContext.evaluate, e.g. to measure what the trained weights use before a method changes them).
    evaluations = (t.steps // t.eval_interval + 1) if t.eval_interval else 1
    train_samples = t.steps * t.global_batch_size if train_samples is None else train_samples
    sizes = [train_samples, max(evaluations * t.eval_steps * t.global_batch_size, valid_samples or 0), 0]
    tokenizer = load_tokenizer(d.tokenizer, d.eod_token) if d.tokenizer else None
    # With data.valid_paths all of the training blend trains and validation is drawn from those
    # prefixes alone (paths_split is None); otherwise data.split carves validation out of the blend.
    (train, valid, _), _ = build_gpt_datasets(
        prefixes,
        d.weights,
        d.paths_split,
        d.seq_length,
        d.seed,
        sizes,
        d.cache_dir,
        cfg.model.vocab_size,
        tokenizer,
        valid_prefixes=d.valid_paths,
        valid_weights=d.valid_weights,
        documents={name: getattr(d, name) for name in DOCUMENT_FLAGS},
    )
    if train is None or (t.eval_interval and valid is None):
        raise ValueError(
            f"data.split={d.paths_split!r} leaves no {'training' if train is None else 'validation'} "
            "documents: give that split a non-zero share"
        )
    return train, valid
