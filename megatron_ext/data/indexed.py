"""Megatron indexed datasets (``.bin`` / ``.idx``) with a modality stream and a manifest.

A dataset prefix P consists of::

    P.bin / P.idx                     token ids, one sequence per document (Megatron's format)
    P.modality.bin / P.modality.idx   one uint8 modality id per token, same documents and lengths
    P.manifest.json                   vocabulary layout, tokenizer identity, statistics

:func:`check_prefix` validates all of it before training, so that a truncated or corrupt file, a
dtype that disagrees with the data size, or a vocabulary that does not fit the model is reported
with the file and the problem instead of surfacing as a crash (or silent garbage) mid-run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_ext.data.vocab import VocabLayout

MANIFEST_VERSION = 1
_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes (indexed_dataset.DType).
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
           8: np.uint16}


class DataError(ValueError):
    """A data file is missing, damaged or does not fit the model; the message names the file."""


def paths(prefix: str | Path) -> dict:
    prefix = str(prefix)
    return {
        "bin": Path(prefix + ".bin"),
        "idx": Path(prefix + ".idx"),
        "modality_bin": Path(prefix + ".modality.bin"),
        "modality_idx": Path(prefix + ".modality.idx"),
        "manifest": Path(prefix + ".manifest.json"),
    }


def token_dtype(vocab_size: int):
    """uint16 when every id fits, else int32 (as Megatron's preprocessing)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def read_index_header(idx_path: Path) -> dict:
    """Parse an .idx file's header and check its size; raise DataError on any inconsistency."""
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _HEADER:
        raise DataError(f"{idx_path}: not a Megatron index file (bad or truncated header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:34])
    if version != 1:
        raise DataError(f"{idx_path}: index version {version} is not supported (expected 1)")
    if code not in _DTYPES:
        raise DataError(f"{idx_path}: unknown dtype code {code}")
    expected = 34 + sequences * (4 + 8) + documents * 8
    if size not in (expected, expected + sequences):  # + sequence modes in Megatron's multimodal form
        raise DataError(f"{idx_path}: {size} bytes, but its header describes {sequences} sequences "
                        f"and {documents} document boundaries ({expected} bytes): the file is truncated "
                        "or corrupt; preprocess the data again")
    lengths = np.fromfile(idx_path, dtype=np.int32, count=sequences, offset=34)
    return {"dtype": _DTYPES[code], "sequences": sequences, "documents": documents, "lengths": lengths}


def _check_pair(bin_path: Path, idx_path: Path) -> dict:
    for p in (bin_path, idx_path):
        if not p.is_file():
            raise DataError(f"{p}: file not found (expected beside {idx_path.name if p == bin_path else bin_path.name})")
    header = read_index_header(idx_path)
    itemsize = np.dtype(header["dtype"]).itemsize
    expected = int(header["lengths"].sum()) * itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise DataError(f"{bin_path}: {actual} bytes, but {idx_path.name} describes "
                        f"{int(header['lengths'].sum())} tokens of {np.dtype(header['dtype']).name} "
                        f"({expected} bytes): the .bin is truncated or the .idx dtype disagrees with it")
    return header


def read_manifest(prefix: str | Path) -> dict:
    path = paths(prefix)["manifest"]
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; preprocess the data with python -m data.preprocess")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise DataError(f"{path}: manifest version {manifest.get('format_version')} is not supported "
                        f"(expected {MANIFEST_VERSION})")
    return manifest


def check_prefix(prefix: str | Path, model_vocab_size: Optional[int] = None,
                 tokenizer_identity: Optional[str] = None) -> dict:
    """Validate a dataset prefix; return its manifest. Raises DataError naming file and problem."""
    p = paths(prefix)
    manifest = read_manifest(prefix)
    tokens = _check_pair(p["bin"], p["idx"])
    modality = _check_pair(p["modality_bin"], p["modality_idx"])
    if not np.array_equal(tokens["lengths"], modality["lengths"]):
        raise DataError(f"{p['modality_idx']}: its documents do not line up with {p['idx'].name}'s; "
                        "the two streams were not written together")
    if tokens["sequences"] != manifest["documents"]:
        raise DataError(f"{p['idx']}: {tokens['sequences']} documents, the manifest says {manifest['documents']}")
    layout = VocabLayout.from_dict(manifest["vocab"])
    if manifest["max_token_id"] >= layout.size:
        raise DataError(f"{p['manifest']}: token id {manifest['max_token_id']} is outside the vocabulary "
                        f"of {layout.size} ids")
    if model_vocab_size is not None and layout.size > model_vocab_size:
        raise DataError(f"{p['manifest']}: the data uses {layout.size} ids (text {layout.text_size} + "
                        f"codebooks) but model.vocab_size is {model_vocab_size}: set model.vocab_size >= "
                        f"{layout.size}")
    if tokenizer_identity is not None and layout.tokenizer != tokenizer_identity:
        raise DataError(f"{p['manifest']}: tokenized with {layout.tokenizer!r}, but this run uses "
                        f"{tokenizer_identity!r}; preprocess again or use the matching tokenizer")
    return manifest
