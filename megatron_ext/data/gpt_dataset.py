"""Megatron's GPTDataset over our prefixes, with the modality stream carried through packing.

GPTDataset packs documents into fixed-length samples through its document / sample / shuffle
indices (cached as .npy files). The modality stream has the same document lengths, so the same
indices select the same spans from it: :class:`MultimodalGPTDataset` reads both through
GPTDataset's own span logic, and ``modality_ids`` stays aligned with ``tokens`` by construction.
A Megatron-LM prefix (no manifest, no modality stream) is text: its ``modality_ids`` are all text.

Documents inside a sample (``data.reset_attention_mask`` / ``reset_position_ids`` / ``eod_mask_loss``)
follow Megatron's dataset flags; under ``reset_attention_mask`` a sample also carries
``document_starts`` (:func:`~megatron_ext.models.documents.document_starts`), the compact mask the
forward step hands the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_ext.compat.datasets import sample_span_from
from megatron_ext.data.indexed import DataError, check_prefix
from megatron_ext.data.tokenizers import TextTokenizer
from megatron_ext.data.vocab import MODALITIES, VocabLayout
from megatron_ext.models.documents import document_starts

DOCUMENT_FLAGS = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
"""Megatron's per-document dataset switches, as ``data`` section fields of the same names."""

UNRECORDED_TOKENIZER = "unrecorded"
"""The tokenizer identity of a blend of Megatron-LM prefixes alone, read without ``data.tokenizer``."""


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
            # check_prefix has established the kind: a modality stream beside every prefix with a
            # manifest, none beside a Megatron-LM prefix (text only).
            modality = dataset_path + ".modality"
            self.modality_dataset = (
                IndexedDataset(modality, mmap=config.mmap_bin_files) if Path(modality + ".idx").is_file() else None
            )

        def _modality_span(self, idx: int, length: int) -> np.ndarray:
            if self.modality_dataset is None:
                return np.full(length, MODALITIES.index("text"), dtype=np.int64)
            # The same document / sample / shuffle indices, read from the modality stream.
            return sample_span_from(self, self.modality_dataset, idx)

        def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
            sample = super().__getitem__(idx)
            length = sample["tokens"].numel() + 1  # the span the inputs and the labels are cut from
            span = np.asarray(self._modality_span(0 if idx is None else idx, length), dtype=np.int64)
            span = torch.from_numpy(span)
            span[span < 0] = 0  # padding (pad id -1) counts as text; its loss is masked anyway
            # A .bin that does not match its manifest (replaced, or written by another tool) would
            # index past the embedding or the modality tables: one max per sample says so instead.
            vocab = self.config.tokenizer.vocab_size
            for name, values, limit in (
                ("token", sample["tokens"], vocab),
                ("token", sample["labels"], vocab),
                ("modality", span, len(MODALITIES)),
            ):
                top = int(values.max()) if values.numel() else 0
                if top >= limit:
                    raise DataError(
                        f"{self.dataset_path}: sample {idx} holds {name} id {top}, outside the "
                        f"{limit} its manifest allows: the .bin files do not match the manifest; "
                        "preprocess the data again"
                    )
            sample["modality_ids"] = span[:-1].contiguous()
            sample["label_modality_ids"] = span[1:].contiguous()
            if self.config.reset_attention_mask:
                sample["document_starts"] = document_starts(sample["tokens"][None], self.config.tokenizer.eod)[0]
            return sample

    return MultimodalGPTDataset


def build_gpt_datasets(
    prefixes: Sequence[str],
    weights: Optional[Sequence[float]],
    split: Optional[str],
    seq_length: int,
    seed: int,
    sizes: List[int],
    cache_dir: str,
    model_vocab_size: int,
    tokenizer: Optional[TextTokenizer] = None,
    *,
    valid_prefixes: Sequence[str] = (),
    valid_weights: Optional[Sequence[float]] = None,
    documents: Optional[Dict[str, bool]] = None,
):
    """([train, valid, test] blended datasets, their shared vocabulary layout) (Megatron's builder;
    call on every rank). ``tokenizer``: the run's ``data.tokenizer``, checked against the data.

    Without ``valid_prefixes`` the three sets are the ``split`` shares of every prefix's documents.
    With them (Megatron-LM's ``--valid-data-path``) the blend of ``prefixes`` is the training set
    whole, validation is the blend of ``valid_prefixes``, and there is no test set: Megatron's
    ``blend_per_split``, which takes no ``split`` (pass None). All prefixes share one id space, so a
    validation loss is measured in the vocabulary the model trains on.

    ``documents``: Megatron's ``reset_position_ids`` / ``reset_attention_mask`` / ``eod_mask_loss``
    (all False when None); any of them needs the blend's EOD id."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    assert (split is None) == bool(valid_prefixes), "give either split or valid_prefixes"
    identity = tokenizer.identity if tokenizer is not None else None
    every = list(prefixes) + list(valid_prefixes)
    manifests = [check_prefix(p, model_vocab_size, identity) for p in every]
    layout = shared_layout(every, manifests, tokenizer, model_vocab_size)
    flags = {name: bool((documents or {}).get(name)) for name in DOCUMENT_FLAGS}
    if any(flags.values()) and layout.eod is None:
        on = ", ".join(f"data.{name}" for name, value in flags.items() if value)
        raise DataError(
            f"{on} needs the token that ends a document, and this data has none recorded ({every[0]} is a "
            "Megatron-LM prefix read without a tokenizer): set data.tokenizer (and data.eod_token if its "
            "end-of-document token is not its eos token)"
        )
    train_blend = (list(prefixes), list(weights) if weights is not None else None)
    if valid_prefixes:
        valid_blend = (list(valid_prefixes), list(valid_weights) if valid_weights is not None else None)
        blends = {"blend_per_split": [train_blend, valid_blend, None]}
    else:
        blends = {"blend": train_blend, "split": split}
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        **blends,
        path_to_cache=cache_dir,
        tokenizer=TokenizerInfo(layout),
        **flags,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    datasets = BlendedMegatronDatasetBuilder(_multimodal_dataset_class(), sizes, lambda: True, config).build()
    return datasets, layout


def shared_layout(
    prefixes: Sequence[str], manifests: Sequence[dict], tokenizer: Optional[TextTokenizer], model_vocab_size: int
) -> VocabLayout:
    """The one id space of a blend. Prefixes with a manifest must agree on it; a Megatron-LM prefix
    (``vocab`` None) brings text ids only, which must be text ids of that space: below its text
    vocabulary (the tokenizer that ``check_prefix`` matched against ``tokenizer``, if given). A blend
    of Megatron-LM prefixes alone takes its space from ``tokenizer``, else from the model."""
    recorded = [(prefix, VocabLayout.from_dict(m["vocab"])) for prefix, m in zip(prefixes, manifests) if m["vocab"]]
    for prefix, layout in recorded[1:]:
        if layout != recorded[0][1]:
            raise ValueError(
                f"{prefix}: its vocabulary layout differs from {recorded[0][0]}'s; blended "
                "datasets (and the validation set) must share one id space"
            )
    if recorded:
        layout, source = recorded[0][1], f"the text vocabulary of {recorded[0][0]} ({recorded[0][1].tokenizer})"
    elif tokenizer is not None:
        layout = VocabLayout(tokenizer=tokenizer.identity, text_size=tokenizer.vocab_size, eod=tokenizer.eod)
        source = f"the vocabulary of data.tokenizer ({tokenizer.identity})"
    else:
        layout = VocabLayout(tokenizer=UNRECORDED_TOKENIZER, text_size=model_vocab_size, eod=None)
        source = "model.vocab_size"
    for prefix, manifest in zip(prefixes, manifests):
        if manifest["vocab"] is None and manifest["max_token_id"] >= layout.text_size:
            raise DataError(
                f"{prefix}.bin: holds token id {manifest['max_token_id']}, outside {source}, "
                f"{layout.text_size} ids: this Megatron-LM data was not written with that tokenizer; "
                "give the tokenizer it was written with as data.tokenizer, or preprocess it again"
            )
    return layout
