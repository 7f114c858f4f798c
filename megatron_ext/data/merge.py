"""Join prefixes written by ``data.preprocess`` into one: the merge step of sharded preprocessing.

Each prefix's token stream and modality stream are appended in turn with Megatron-Core's
``IndexedDatasetBuilder.add_index`` (the ``.bin`` bytes copied, the ``.idx`` document lists
concatenated), and a manifest is written whose statistics are the sums (the largest id, the
maximum) of the inputs'. The parts of one sharded job (:class:`~megatron_ext.data.sources.Shard`)
are put in shard order whatever the order given and must all be there; since each shard holds a
contiguous range of the input, the merged output then equals that of one process byte for byte,
manifest included. Prefixes that are not shards are appended in the order given.

Prefixes written with different vocabularies (tokenizer, end-of-document id or codebooks) are
refused: their ids mean different things, and one manifest could not describe them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

import numpy as np

from megatron_ext.data.indexed import DataError, check_prefix, is_megatron_prefix, paths
from megatron_ext.data.preprocess import build_manifest, discard_partial, move_into_place
from megatron_ext.data.vocab import MODALITIES, VocabLayout


def _ordered(prefixes: List[str], manifests: List[dict]) -> List[int]:
    """The order to append the inputs in: shard order for the parts of one job (all of them
    required, each once), the given order for prefixes that are not shards."""
    shards = [m.get("shard") for m in manifests]
    if not any(shards):
        return list(range(len(prefixes)))
    if not all(shards):
        plain = prefixes[shards.index(None)]
        raise DataError(
            f"{plain}: not a shard, but other inputs are shards of a sharded job; merge the shards "
            "first, then merge the result with other prefixes"
        )
    count = shards[0]["count"]
    for prefix, manifest, shard in zip(prefixes, manifests, shards):
        if shard["count"] != count or manifest["sources"] != manifests[0]["sources"]:
            raise DataError(
                f"{prefix}: shard {shard['index']} of {shard['count']} of {manifest['sources']}, but "
                f"{prefixes[0]} is a shard of {count} of {manifests[0]['sources']}: merge the shards of "
                "one job at a time"
            )
    indices = sorted(s["index"] for s in shards)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        what = " and ".join(
            [f"shards {missing} are missing"] * bool(missing) + [f"shards {repeated} are given twice"] * bool(repeated)
        )
        raise DataError(
            f"the inputs are {len(indices)} shards of a job split into {count}, but {what}: pass each "
            f"output of --shard-index 0 .. {count - 1} once"
        )
    return sorted(range(len(prefixes)), key=lambda i: shards[i]["index"])


def _check_same_vocab(prefixes: List[str], manifests: List[dict]) -> None:
    first = VocabLayout.from_dict(manifests[0]["vocab"])
    for prefix, manifest in zip(prefixes[1:], manifests[1:]):
        layout = VocabLayout.from_dict(manifest["vocab"])
        if layout.tokenizer != first.tokenizer:
            raise DataError(
                f"{prefix}: tokenized with {layout.tokenizer!r}, but {prefixes[0]} with {first.tokenizer!r}; "
                "preprocess every input with the same tokenizer before merging"
            )
        if manifest["vocab"] != manifests[0]["vocab"]:
            raise DataError(
                f"{prefix}: its vocabulary layout (end-of-document id or codebooks) differs from that of "
                f"{prefixes[0]}; preprocess every input with the same --eod-token and --codebook options"
            )


def merge(prefixes: Sequence[str | Path], output_prefix: str | Path) -> dict:
    """Write ``output_prefix`` as the concatenation of ``prefixes`` (see the module docstring);
    return its manifest.

    Every input is checked first (:func:`~megatron_ext.data.indexed.check_prefix`: files complete
    and consistent); a Megatron-LM prefix without a manifest, an output among the inputs, mixed
    vocabularies and an incomplete set of shards are refused before anything is written. As in
    preprocessing, the output is written to temporaries and moved into place once complete.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefixes = [str(p) for p in prefixes]
    if not prefixes:
        raise DataError("merge: no input prefixes given; pass --inputs P0 P1 ...")
    if str(output_prefix) in prefixes:
        raise DataError(f"{output_prefix}: the output prefix is also an input; choose another output prefix")
    for prefix in prefixes:
        if is_megatron_prefix(prefix):
            raise DataError(
                f"{prefix}: a Megatron-LM prefix without a manifest; merge only outputs of python -m data.preprocess"
            )
    manifests = [check_prefix(p) for p in prefixes]
    order = _ordered(prefixes, manifests)
    prefixes = [prefixes[i] for i in order]
    manifests = [manifests[i] for i in order]
    _check_same_vocab(prefixes, manifests)

    out = paths(output_prefix)
    out["bin"].parent.mkdir(parents=True, exist_ok=True)
    tmp = {k: v.with_name(v.name + ".tmp") for k, v in out.items()}
    builders = []
    try:
        tokens_builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=np.dtype(manifests[0]["dtype"]).type)
        builders.append(tokens_builder)
        modality_builder = IndexedDatasetBuilder(str(tmp["modality_bin"]), dtype=np.uint8)
        builders.append(modality_builder)
        for prefix in prefixes:
            tokens_builder.add_index(prefix)
            modality_builder.add_index(f"{prefix}.modality")  # the modality stream's own prefix
        tokens_builder.finalize(str(tmp["idx"]))
        modality_builder.finalize(str(tmp["modality_idx"]))
        sharded = "shard" in manifests[0]
        sources = manifests[0]["sources"] if sharded else [s for m in manifests for s in m["sources"]]
        manifest = build_manifest(
            manifests[0]["vocab"],
            sum(m["documents"] for m in manifests),
            sum(m["tokens"] for m in manifests),
            {name: sum(m["tokens_per_modality"].get(name, 0) for m in manifests) for name in MODALITIES},
            max(m["max_token_id"] for m in manifests),
            manifests[0]["dtype"],
            list(dict.fromkeys(sources)),
        )
        tmp["manifest"].write_text(json.dumps(manifest, indent=1))
    except BaseException:
        discard_partial(builders, tmp)
        raise
    move_into_place(tmp, out)
    return manifest
