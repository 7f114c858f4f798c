"""Megatron indexed datasets (``.bin`` / ``.idx``) with a modality stream and a manifest.

A dataset prefix P written by ``python -m data.preprocess`` consists of::

    P.bin / P.idx                     token ids, one sequence per document (Megatron's format)
    P.modality.bin / P.modality.idx   one uint8 modality id per token, same documents and lengths
    P.manifest.json                   vocabulary layout, tokenizer identity, statistics

A prefix of Megatron-LM's own ``tools/preprocess_data.py`` has ``P.bin`` / ``P.idx`` alone: it is
read as text, with no record of its tokenizer. What the manifest would say about its ids is found
by scanning the token stream once (:func:`scan_ids`) and cached beside it (``P.idscan.json``).

:func:`check_prefix` validates either kind before training, so that a truncated or corrupt file, a
dtype that disagrees with the data size, or a vocabulary that does not fit the model is reported
with the file and the problem instead of surfacing as a crash (or silent garbage) mid-run.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from megatron_ext.data.vocab import VocabLayout

MANIFEST_VERSION = 1
_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes (indexed_dataset.DType).
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


class DataError(ValueError):
    """A data file is missing, damaged or does not fit the model; the message names the file."""


def paths(prefix: str | Path) -> dict:
    """The files of a prefix written by ``data.preprocess`` (what it writes and moves into place)."""
    prefix = str(prefix)
    return {
        "bin": Path(prefix + ".bin"),
        "idx": Path(prefix + ".idx"),
        "modality_bin": Path(prefix + ".modality.bin"),
        "modality_idx": Path(prefix + ".modality.idx"),
        "manifest": Path(prefix + ".manifest.json"),
    }


def scan_cache_path(prefix: str | Path) -> Path:
    """Where :func:`scan_ids` keeps its result for a prefix without a manifest."""
    return Path(str(prefix) + ".idscan.json")


def is_megatron_prefix(prefix: str | Path) -> bool:
    """Whether ``prefix`` is Megatron-LM's own output: ``P.bin`` and ``P.idx``, with neither our
    manifest nor a modality stream (a modality stream without its manifest is an incomplete output
    of ``data.preprocess``, which :func:`check_prefix` refuses)."""
    p = paths(prefix)
    return (
        p["bin"].is_file()
        and p["idx"].is_file()
        and not p["manifest"].exists()
        and not p["modality_bin"].exists()
        and not p["modality_idx"].exists()
    )


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
        raise DataError(
            f"{idx_path}: {size} bytes, but its header describes {sequences} sequences "
            f"and {documents} document boundaries ({expected} bytes): the file is truncated "
            "or corrupt; preprocess the data again"
        )
    lengths = np.fromfile(idx_path, dtype=np.int32, count=sequences, offset=34)
    return {
        "dtype": _DTYPES[code],
        "sequences": sequences,
        "documents": documents,
        "lengths": lengths,
        "sequence_modes": sequences > 0 and size == expected + sequences,
    }


def _check_pair(bin_path: Path, idx_path: Path) -> dict:
    for p in (bin_path, idx_path):
        if not p.is_file():
            other = idx_path if p == bin_path else bin_path
            raise DataError(f"{p}: file not found (expected beside {other.name})")
    header = read_index_header(idx_path)
    itemsize = np.dtype(header["dtype"]).itemsize
    expected = int(header["lengths"].sum()) * itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise DataError(
            f"{bin_path}: {actual} bytes, but {idx_path.name} describes "
            f"{int(header['lengths'].sum())} tokens of {np.dtype(header['dtype']).name} "
            f"({expected} bytes): the .bin is truncated or the .idx dtype disagrees with it"
        )
    return header


def read_manifest(prefix: str | Path) -> dict:
    p = paths(prefix)
    path = p["manifest"]
    if not path.is_file():
        if p["modality_bin"].exists() or p["modality_idx"].exists():
            raise DataError(
                f"{path}: manifest not found beside {p['modality_idx'].name}: the output of "
                "python -m data.preprocess is incomplete (the run writing it stopped); preprocess "
                "the data again"
            )
        raise DataError(
            f"{path}: manifest not found, nor a Megatron-LM {p['bin'].name} / {p['idx'].name} pair: "
            "preprocess the data with python -m data.preprocess"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise DataError(
            f"{path}: manifest version {manifest.get('format_version')} is not supported (expected {MANIFEST_VERSION})"
        )
    return manifest


def check_prefix(
    prefix: str | Path, model_vocab_size: Optional[int] = None, tokenizer_identity: Optional[str] = None
) -> dict:
    """Validate a dataset prefix; return its manifest. Raises DataError naming file and problem.

    A Megatron-LM prefix (:func:`is_megatron_prefix`) gets the manifest its id scan implies
    (:func:`megatron_manifest`): its ids are checked against ``model_vocab_size``; it records no
    tokenizer, so ``tokenizer_identity`` cannot be checked against it.
    """
    if is_megatron_prefix(prefix):
        return check_megatron_prefix(prefix, model_vocab_size)
    p = paths(prefix)
    manifest = read_manifest(prefix)
    tokens = _check_pair(p["bin"], p["idx"])
    modality = _check_pair(p["modality_bin"], p["modality_idx"])
    if not np.array_equal(tokens["lengths"], modality["lengths"]):
        raise DataError(
            f"{p['modality_idx']}: its documents do not line up with {p['idx'].name}'s; "
            "the two streams were not written together"
        )
    if tokens["sequences"] != manifest["documents"]:
        raise DataError(f"{p['idx']}: {tokens['sequences']} documents, the manifest says {manifest['documents']}")
    layout = VocabLayout.from_dict(manifest["vocab"])
    if manifest["max_token_id"] >= layout.size:
        raise DataError(
            f"{p['manifest']}: token id {manifest['max_token_id']} is outside the vocabulary of {layout.size} ids"
        )
    if model_vocab_size is not None and layout.size > model_vocab_size:
        raise DataError(
            f"{p['manifest']}: the data uses {layout.size} ids (text {layout.text_size} + "
            f"codebooks) but model.vocab_size is {model_vocab_size}: set model.vocab_size >= "
            f"{layout.size}"
        )
    if tokenizer_identity is not None and layout.tokenizer != tokenizer_identity:
        raise DataError(
            f"{p['manifest']}: tokenized with {layout.tokenizer!r}, but this run uses "
            f"{tokenizer_identity!r}; preprocess again or use the matching tokenizer"
        )
    return manifest


SCAN_VERSION = 1
_SCAN_CHUNK = 1 << 26
"""Token ids per step of a scan: its min and max are taken while the chunk is in the page cache, so
the file is read from disk once for both."""


@dataclass(frozen=True)
class IdScan:
    """The token-id range of a ``.bin``, with the sizes and times of the files it was read from: a
    cached scan is reused only while both files are unchanged."""

    min_id: int
    """Smallest token id (-1 for an empty stream)."""
    max_id: int
    """Largest token id (-1 for an empty stream)."""
    tokens: int
    """Number of token ids scanned."""
    bin_stat: Tuple[int, int]
    """(size, mtime_ns) of the .bin when scanned."""
    idx_stat: Tuple[int, int]
    """(size, mtime_ns) of the .idx when scanned."""
    version: int = SCAN_VERSION
    """Format of the cache file; another version is scanned again."""


def _stat(path: Path) -> Tuple[int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns)


def _cached_scan(prefix: str | Path, bin_stat: Tuple[int, int], idx_stat: Tuple[int, int]) -> Optional[IdScan]:
    path = scan_cache_path(prefix)
    try:
        data = json.loads(path.read_text())
        scan = IdScan(**{**data, "bin_stat": tuple(data["bin_stat"]), "idx_stat": tuple(data["idx_stat"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None  # missing, written by another version, or damaged: scan again
    if (scan.version, scan.bin_stat, scan.idx_stat) != (SCAN_VERSION, bin_stat, idx_stat):
        return None
    return scan


def scan_ids(prefix: str | Path, dtype) -> IdScan:
    """The smallest and largest token id of ``P.bin`` (of numpy ``dtype``), by numpy over a memory
    map in chunks: read once per version of the files, then from ``P.idscan.json``.

    The cache is written atomically (a temporary file renamed into place), so ranks that scan the
    same prefix at once each write a complete file. Where the prefix's directory is read-only the
    result is not cached (a warning says so) and every run scans again.
    """
    p = paths(prefix)
    bin_stat, idx_stat = _stat(p["bin"]), _stat(p["idx"])
    cached = _cached_scan(prefix, bin_stat, idx_stat)
    if cached is not None:
        return cached
    ids = np.memmap(p["bin"], dtype=dtype, mode="r") if bin_stat[0] else np.zeros(0, dtype=dtype)
    chunks = (ids[start : start + _SCAN_CHUNK] for start in range(0, len(ids), _SCAN_CHUNK))
    bounds = [(int(chunk.min()), int(chunk.max())) for chunk in chunks]
    del ids, chunks
    low, high = (min(b[0] for b in bounds), max(b[1] for b in bounds)) if bounds else (-1, -1)
    scan = IdScan(
        min_id=low, max_id=high, tokens=bin_stat[0] // np.dtype(dtype).itemsize, bin_stat=bin_stat, idx_stat=idx_stat
    )
    path = scan_cache_path(prefix)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(asdict(scan)))
        tmp.replace(path)
    except OSError as err:
        if tmp.exists():
            tmp.unlink()
        warnings.warn(
            f"{path}: cannot cache the token-id scan of {p['bin'].name} ({err}); the next run scans it again",
            stacklevel=2,
        )
    return scan


def megatron_manifest(prefix: str | Path) -> dict:
    """The manifest that a Megatron-LM prefix (``P.bin`` / ``P.idx``, no manifest) implies: its files
    checked for consistency, its ids scanned (:func:`scan_ids`). ``vocab`` is None: the prefix
    records neither its tokenizer nor its end-of-document id; its ids are text."""
    p = paths(prefix)
    header = _check_pair(p["bin"], p["idx"])
    if header["sequence_modes"]:
        raise DataError(
            f"{p['idx']}: the index holds per-sequence modes (Megatron's multimodal format); a "
            "prefix without a manifest is read as text only: preprocess the data with python -m "
            "data.preprocess"
        )
    scan = scan_ids(prefix, header["dtype"])
    if scan.min_id < 0:
        raise DataError(
            f"{p['bin']}: holds token id {scan.min_id}; token ids cannot be negative: the file is "
            "damaged or was not written by Megatron-LM's preprocessing"
        )
    documents = max(header["documents"] - 1, 0)  # the document index starts with a 0 boundary
    return {
        "format": "megatron-lm",
        "vocab": None,
        "documents": documents,
        "sequences": header["sequences"],
        "tokens": scan.tokens,
        "max_token_id": scan.max_id,
        "dtype": np.dtype(header["dtype"]).name,
    }


def check_megatron_prefix(prefix: str | Path, model_vocab_size: Optional[int] = None) -> dict:
    """Validate a Megatron-LM prefix; return its implied manifest (:func:`megatron_manifest`).
    Every id must be below ``model_vocab_size``: the one check a vocabulary allows without knowing
    which tokenizer wrote the data."""
    manifest = megatron_manifest(prefix)
    top = manifest["max_token_id"]
    if model_vocab_size is not None and top >= model_vocab_size:
        raise DataError(
            f"{paths(prefix)['bin']}: holds token id {top}, but model.vocab_size is "
            f"{model_vocab_size}: the data was tokenized with a larger vocabulary; set "
            f"model.vocab_size >= {top + 1} (at least the vocabulary of the tokenizer that wrote it) or "
            "use data written with the model's tokenizer"
        )
    return manifest
