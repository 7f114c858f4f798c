"""A second token stream read with a ``GPTDataset``'s own sample layout.

Written for megatron-core 0.16.1. A multimodal sample carries, next to its tokens, one modality
id per token, stored as a second indexed dataset with the same documents. Its span must come from
the same document / sample / shuffle indices as the tokens, which only the private
``GPTDataset._query_document_sample_shuffle_indices(idx)`` maps to document reads: it reads
``self.dataset`` (the token ``IndexedDataset``, set by ``MegatronDataset.__init__``), so
:func:`sample_span_from` points that attribute at the other stream for one call. Checked on first
use (:mod:`megatron_ext.compat.internals`).
"""

from __future__ import annotations

import numpy as np

from megatron_ext.compat.internals import Internal, require

INTERNALS = (
    Internal(
        "megatron.core.datasets.gpt_dataset",
        "GPTDataset._query_document_sample_shuffle_indices",
        parameters=("idx",),
        positional=True,
        source_contains=("self.dataset.get(",),
    ),
    Internal(
        "megatron.core.datasets.megatron_dataset",
        "MegatronDataset.__init__",
        parameters=("dataset",),
        source_contains=("self.dataset = dataset",),
    ),
)
"""Every Megatron-Core internal this module relies on."""


def sample_span_from(dataset, source, idx: int) -> np.ndarray:
    """Sample ``idx`` of the ``GPTDataset`` ``dataset``, its values read from ``source`` instead of
    the token stream (an ``IndexedDataset`` with the same document lengths); padded alike."""
    require("megatron_ext.compat.datasets.sample_span_from", INTERNALS)
    tokens, dataset.dataset = dataset.dataset, source
    try:
        span, _ = dataset._query_document_sample_shuffle_indices(idx)
    finally:
        dataset.dataset = tokens
    return span
