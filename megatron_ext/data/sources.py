"""Where preprocessing reads documents from, and which of them one shard of a job reads.

``--input`` names text files (``.jsonl``, ``.txt``), parquet files, or a directory written by HF
``datasets``' ``Dataset.save_to_disk``; a quoted glob stands for the files it matches, in sorted
order. Text files are read line by line by :mod:`megatron_ext.data.preprocess`; parquet files and
saved datasets through the ``datasets`` library (:class:`RowSource`): parquet in streaming mode,
a saved dataset as the memory map it is, so that memory stays flat whatever the input's size.

Every source is a sequence of *records* (a line of a text file, a row of a table) in a fixed order:
the inputs in the order given, each from its start. A job split into N shards (:class:`Shard`)
gives shard I the contiguous records ``[T*I // N, T*(I+1) // N)`` of the T records of all inputs,
so that concatenating the shards' outputs in shard order (``data.preprocess merge``) reproduces the
output of one process byte for byte. Contiguous ranges, rather than record i to shard i mod N, are
what make the merge a plain concatenation; the price is that each shard first counts the records
(free for parquet and saved datasets, whose metadata hold it; one read of each text file).
"""

from __future__ import annotations

import glob
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Protocol, Sequence, Tuple

from megatron_ext.data.indexed import DataError

# The record column that holds a multimodal document (see megatron_ext.data.preprocess).
SEGMENTS = "segments"


@dataclass(frozen=True)
class Shard:
    """One part of a preprocessing job split over ``count`` processes (e.g. a SLURM array)."""

    index: int = 0
    """Which part, ``0 <= index < count``."""
    count: int = 1
    """How many parts the job is split into."""

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"--num-shards {self.count}: must be at least 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"--shard-index {self.index}: must be in [0, {self.count}) for --num-shards {self.count}")

    def records(self, total: int) -> Tuple[int, int]:
        """The [start, stop) of the records this shard owns out of ``total``: contiguous ranges whose
        sizes differ by at most one, in shard order."""
        return total * self.index // self.count, total * (self.index + 1) // self.count


class Source(Protocol):
    """An input: a sequence of records, each yielded as ``(where, line number or None, record)``."""

    name: str

    def num_records(self) -> int:
        """How many records (documents, empty ones included) the source holds."""

    def records(self, start: int = 0, stop: Optional[int] = None) -> Iterator[Tuple[str, Optional[int], dict]]:
        """Records ``[start, stop)`` in order."""


def expand_inputs(inputs: Sequence[str | Path]) -> List[Path]:
    """``inputs`` with each glob pattern replaced by the paths it matches, sorted (so that every
    shard of a job sees the same order); a pattern that matches nothing is an error, since the
    user meant some files."""
    expanded: List[Path] = []
    for item in inputs:
        item = str(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"{item}: no file matches this pattern; check the path and the quoting")
            expanded += [Path(m) for m in matches]
        else:
            expanded.append(Path(item))
    return expanded


def is_table(path: Path) -> bool:
    """Whether ``path`` is read through the ``datasets`` library: a parquet file or a directory."""
    return path.suffix == ".parquet" or path.is_dir()


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "reading parquet files or saved datasets needs the datasets package: pip install .[hf]"
        ) from None
    datasets.disable_progress_bars()  # preprocessing draws its own; these would interleave with it
    return datasets


class RowSource:
    """A parquet file (streamed with ``datasets.load_dataset("parquet", streaming=True)``) or a
    saved dataset (``datasets.load_from_disk``, memory-mapped), read as rows.

    Opening checks what can be checked before any work: that the file or directory is readable as
    such and that it has the text column (``text_key``) or a ``segments`` column. Only those columns
    are read. A row's location in messages is ``PATH (row i)``, ``i`` counted from 0 as
    ``dataset[i]`` counts.
    """

    def __init__(self, path: Path, text_key: str):
        self.name = str(path)
        self.path = path
        datasets = _datasets()
        if path.is_dir():
            self._dataset = self._load_saved(datasets)
            features = self._dataset.features
            self._rows = self._dataset.num_rows
        else:
            try:
                self._dataset = datasets.load_dataset("parquet", data_files=[str(path)], split="train", streaming=True)
                import pyarrow.parquet as pq

                self._rows = pq.ParquetFile(path).metadata.num_rows
            except FileNotFoundError:
                raise DataError(f"{path}: input file not found") from None
            except Exception as err:  # any reader's error: say which file and that it is not parquet
                raise DataError(f"{path}: cannot be read as a parquet file ({type(err).__name__}: {err})") from None
            features = self._dataset.features
        columns = list(features or {})
        keep = [c for c in (text_key, SEGMENTS) if c in columns]
        if not keep:
            raise DataError(
                f"{path}: no column {text_key!r} (its columns: {', '.join(columns) or 'none'}); pass "
                "--text-key with the column that holds the documents' text"
            )
        dtype = getattr(features.get(text_key), "dtype", None)
        if text_key in columns and dtype not in ("string", "large_string"):
            raise DataError(
                f"{path}: column {text_key!r} holds {features[text_key]}, not text; pass --text-key with "
                "the column that holds the documents' text"
            )
        self._dataset = self._dataset.select_columns(keep)

    def _load_saved(self, datasets):
        path = self.path
        if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise DataError(
                f"{path}: a directory, but not one written by Dataset.save_to_disk (no state.json); "
                f"pass the files inside it instead, e.g. '{path}/*.parquet'"
            )
        try:
            dataset = datasets.load_from_disk(str(path))
        except Exception as err:
            raise DataError(f"{path}: cannot be read as a saved dataset ({type(err).__name__}: {err})") from None
        if isinstance(dataset, datasets.DatasetDict):
            splits = list(dataset)
            if len(splits) != 1:
                raise DataError(
                    f"{path}: a dataset with the splits {', '.join(splits)}; pass the split to "
                    f"preprocess as --input, e.g. {path / splits[0]}"
                )
            dataset = dataset[splits[0]]
        return dataset

    def num_records(self) -> int:
        return self._rows

    def records(self, start: int = 0, stop: Optional[int] = None) -> Iterator[Tuple[str, Optional[int], dict]]:
        stop = self._rows if stop is None else min(stop, self._rows)
        if start >= stop:
            return
        if isinstance(self._dataset, _datasets().Dataset):
            rows = self._dataset.select(range(start, stop))  # contiguous: a slice of the memory map
        else:
            rows = self._dataset.skip(start).take(stop - start)
        for i, row in enumerate(rows, start):
            yield f"{self.name} (row {i})", None, row


def shard_records(
    sources: Sequence[Source], shard: Shard
) -> Tuple[Iterator[Tuple[str, Optional[int], dict]], Optional[int]]:
    """The records of ``sources`` that ``shard`` owns, and how many there are (None when not
    counted: an unsharded run reads everything and needs no count, except for the progress bar,
    which gets one where it is free)."""
    if shard.count == 1:
        free = all(isinstance(s, RowSource) for s in sources)
        total = sum(s.num_records() for s in sources) if free else None
        return itertools.chain.from_iterable(s.records() for s in sources), total
    counts = [s.num_records() for s in sources]
    if sum(counts) == 0:
        raise DataError(f"no documents found in {', '.join(s.name for s in sources)}: the input is empty")
    start, stop = shard.records(sum(counts))
    parts = []
    offset = 0
    for source, count in zip(sources, counts):
        lo, hi = max(start - offset, 0), min(stop - offset, count)
        if lo < hi:
            parts.append(source.records(lo, hi))
        offset += count
    return itertools.chain.from_iterable(parts), stop - start
