"""Megatron's GPTDataset over our prefixes, with the modality stream carried through packing.

GPTDataset packs documents into fixed-length samples through its document / sample / shuffle
indices (cached as .npy files). The modality stream has the same document lengths, so the same
indices select the same spans from it: :class:`MultimodalGPTDataset` reads both through
GPTDataset's own span logic, and ``modality_ids`` stays aligned with ``tokens`` by construction.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_ext.compat.datasets import sample_span_from
from megatron_ext.data.indexed import DataError, check_prefix
from megatron_ext.data.vocab import MODALITIES, VocabLayout


class TokenizerInfo:
    """What Megatron's dataset code asks of a tokenizer: EOD, vocabulary size, identity."""

    def __init__(self, layout: VocabLayout):
        self.eod = layout.eod
        self.vocab_size = layout.size
        self.unique_identifiers = {"tokenizer": layout.tokenizer, "vocab_size": layout.size}


def _multimodal_dataset_class():
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    class MultimodalGPTDataset(GPTDataset):
        """GPTDataset whose samples also carry ``modality_ids`` (inputs) and ``label_modality_ids``."""

        def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
            super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
            self.modality_dataset = IndexedDataset(dataset_path + ".modality", mmap=config.mmap_bin_files)

        def _modality_span(self, idx: int) -> np.ndarray:
            # The same document / sample / shuffle indices, read from the modality stream.
            return sample_span_from(self, self.modality_dataset, idx)

        def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
            sample = super().__getitem__(idx)
            span = torch.from_numpy(np.asarray(self._modality_span(0 if idx is None else idx), dtype=np.int64))
            span[span < 0] = 0  # padding (pad id -1) counts as text; its loss is masked anyway
            # A .bin that does not match its manifest (replaced, or written by another tool) would
            # index past the embedding or the modality tables: one max per sample says so instead.
            vocab = self.config.tokenizer.vocab_size
            for name, values, limit in (("token", sample["tokens"], vocab), ("token", sample["labels"], vocab),
                                        ("modality", span, len(MODALITIES))):
                top = int(values.max()) if values.numel() else 0
                if top >= limit:
                    raise DataError(f"{self.dataset_path}: sample {idx} holds {name} id {top}, outside the "
                                    f"{limit} its manifest allows: the .bin files do not match the manifest; "
                                    "preprocess the data again")
            sample["modality_ids"] = span[:-1].contiguous()
            sample["label_modality_ids"] = span[1:].contiguous()
            return sample

    return MultimodalGPTDataset


def build_gpt_datasets(
    prefixes: Sequence[str],
    weights: Optional[Sequence[float]],
    split: str,
    seq_length: int,
    seed: int,
    sizes: List[int],
    cache_dir: str,
    model_vocab_size: int,
    tokenizer_identity: Optional[str] = None,
):
    """[train, valid, test] blended datasets (Megatron's builder; call on every rank)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    manifests = [check_prefix(p, model_vocab_size, tokenizer_identity) for p in prefixes]
    layouts = [VocabLayout.from_dict(m["vocab"]) for m in manifests]
    for prefix, layout in zip(prefixes[1:], layouts[1:]):
        if layout != layouts[0]:
            raise ValueError(f"{prefix}: its vocabulary layout differs from {prefixes[0]}'s; blended "
                             "datasets must share one id space")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(prefixes), list(weights) if weights is not None else None),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=TokenizerInfo(layouts[0]),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    datasets = BlendedMegatronDatasetBuilder(
        _multimodal_dataset_class(), sizes, lambda: True, config
    ).build()
    return datasets, layouts[0]
