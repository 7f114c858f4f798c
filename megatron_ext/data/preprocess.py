"""Documents (JSONL, plain text, parquet, HF datasets) -> token and modality streams in Megatron's
indexed format.

Input records, one per line of a ``.jsonl`` file (or one per row of a parquet file or saved
dataset, read through :mod:`megatron_ext.data.sources`)::

    {"text": "a plain text document"}
    {"segments": [{"modality": "text", "text": "a caption"},
                  {"modality": "image", "tokens": [3, 0, 16, ...]}]}   # codebook indices

or, for a ``.txt`` file, one document per non-empty line. Text is tokenized; a segment of modality
m becomes ``m.begin, m.offset + codes..., m.end``; every document ends with EOD. Documents are
encoded by worker processes and written in input order, so the output does not depend on the
number of workers; a job split into shards (``--num-shards``) writes one prefix per shard, which
``data.preprocess merge`` (:mod:`megatron_ext.data.merge`) joins into the output of one process.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.data.indexed import MANIFEST_VERSION, DataError, paths, token_dtype
from megatron_ext.data.sources import RowSource, Shard, Source, expand_inputs, is_table, shard_records
from megatron_ext.data.tokenizers import load_tokenizer, require_eod
from megatron_ext.data.vocab import MODALITIES, VocabLayout


def _kind(value) -> str:
    """A JSON value's type in words, for messages about records of the wrong shape."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else type(value).__name__


def _the_record(line_no) -> str:
    return f"the record on line {line_no}" if line_no is not None else "that record"


def _record_error(file, line_no, problem: str, fix: str = "") -> str:
    """The message for one bad input record: where it is (``file:line:``, as editors read it, and
    the line spelled out; a table's row has no line, ``file`` then names the row), what is wrong
    with it and what to do about it."""
    fix = fix or f"fix or remove {_the_record(line_no)} and run again"
    return f"{file}:{line_no}: {problem}; {fix}" if line_no is not None else f"{file}: {problem}; {fix}"


_RECORD_SHAPE = 'a JSON object such as {"text": "..."} or {"segments": [...]}'
_SEGMENT_SHAPE = 'an object such as {"modality": "text", "text": "..."}'


def check_record(file, line_no, record, json_key: str = "text") -> None:
    """Raise DataError unless ``record`` has the shape of a document.

    This checks what needs no vocabulary: an object with a string ``json_key`` or a list of
    ``segments``, each an object with a known modality, a string ``text`` for text and a list of
    ``tokens`` otherwise. That every token is an integer inside its codebook is checked when the
    document is encoded (:func:`_encode`), where the codebook sizes are known. Checking here keeps a
    malformed record from reaching the encoder as a traceback without file or line.
    """

    def bad(problem):
        return DataError(_record_error(file, line_no, problem))

    if not isinstance(record, dict):
        raise bad(f"the record is {_kind(record)}, but each line must be {_RECORD_SHAPE}")
    if "segments" not in record and json_key not in record:
        raise bad(f"a record needs {json_key!r} or 'segments'")
    segments = record.get("segments")
    if "segments" in record and not isinstance(segments, list):
        raise bad(f"'segments' is {_kind(segments)}, not a list of segments, each {_SEGMENT_SHAPE}")
    if not segments:  # no segments (or an empty list): the document is the record's text
        if json_key in record and not isinstance(record[json_key], str):
            raise bad(f"{json_key!r} is {_kind(record[json_key])}, not a string")
        return
    for n, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise bad(f"segment {n} is {_kind(seg)}, not {_SEGMENT_SHAPE}")
        name = seg.get("modality", "text")
        if not isinstance(name, str):
            raise bad(f"segment {n}: 'modality' is {_kind(name)}, not a string (one of {', '.join(MODALITIES)})")
        if name not in MODALITIES:
            raise bad(f"segment {n}: unknown modality {name!r} (known: {', '.join(MODALITIES)})")
        if name == "text":
            if not isinstance(seg.get("text", ""), str):
                raise bad(f"segment {n}: 'text' is {_kind(seg['text'])}, not a string")
        elif not isinstance(seg.get("tokens", []), list):
            raise bad(f"segment {n}: {name} 'tokens' is {_kind(seg['tokens'])}, not a list of integer codebook ids")


def _decoded(file: Path, line_no: int, line: str) -> str:
    """``line`` (read with ``surrogateescape``) if it was valid UTF-8, else a DataError naming the
    line and the first offending byte."""
    if not line.isascii():
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as err:
            byte = ord(line[err.start]) - 0xDC00 if "\udc80" <= line[err.start] <= "\udcff" else None
            what = f"byte 0x{byte:02x}" if byte is not None else f"character {line[err.start]!r}"
            raise DataError(
                _record_error(
                    file,
                    line_no,
                    f"not valid UTF-8 ({what} at character {err.start + 1} of the line)",
                    f"save the file as UTF-8 or remove line {line_no}, and run again",
                )
            ) from None
    return line


def iter_documents(files: Sequence[str | Path], json_key: str = "text") -> Iterator[Tuple[str, int, dict]]:
    """Yield ``(file, line number, record)`` for every document of the input files.

    Raises DataError, naming the file and line, on the first line that is not UTF-8, not JSON (in
    a ``.jsonl`` file) or not a record of the documented shape (:func:`check_record`).
    """
    for file in files:
        yield from _read_text_file(Path(file), json_key)


def _open_text(file: Path):
    if not file.is_file():
        raise DataError(f"{file}: input file not found")
    # surrogateescape: a bad byte fails on its own line (see _decoded), not in a read-ahead block.
    return open(file, encoding="utf-8", errors="surrogateescape")


def _read_text_file(
    file: Path, json_key: str, start: int = 0, stop: Optional[int] = None
) -> Iterator[Tuple[str, int, dict]]:
    """The documents on lines ``start + 1 .. stop`` of a ``.jsonl`` or text file (all lines by
    default), checked as :func:`iter_documents` says. Lines outside the range are not decoded."""
    with _open_text(file) as f:
        for line_no, line in enumerate(itertools.islice(f, start, stop), start + 1):
            line = _decoded(file, line_no, line)
            if not line.strip():
                continue
            if file.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(_record_error(file, line_no, f"not valid JSON ({err.msg})")) from None
                check_record(file, line_no, record, json_key)
                yield str(file), line_no, record
            else:
                yield str(file), line_no, {json_key: line.rstrip("\n")}


class _TextFile:
    """A ``.jsonl`` or text file as a :class:`~megatron_ext.data.sources.Source`: its records are its
    lines, empty ones included, split as Python's text files split them (so that counting and
    reading agree on every line ending)."""

    def __init__(self, path: Path, json_key: str):
        self.name = str(path)
        self.path = path
        self.json_key = json_key
        _open_text(path).close()  # a missing or unreadable file is reported before any work

    def num_records(self) -> int:
        with _open_text(self.path) as f:
            return sum(1 for _ in f)

    def records(self, start: int = 0, stop: Optional[int] = None) -> Iterator[Tuple[str, int, dict]]:
        return _read_text_file(self.path, self.json_key, start, stop)


def open_sources(inputs: Sequence[str | Path], json_key: str = "text") -> List[Source]:
    """The inputs (paths or quoted globs) as sources, each checked as far as it can be without
    reading its documents: that it exists and can be read, and for a table that it has the column
    ``json_key``. Raises DataError, naming the input, on the first that fails."""
    return [
        RowSource(path, json_key) if is_table(path) else _TextFile(path, json_key) for path in expand_inputs(inputs)
    ]


def _checked(documents: Iterable[Tuple[str, int, dict]], json_key: str) -> Iterator[Tuple[str, int, dict]]:
    """Given documents, checked as :func:`iter_documents` checks those it reads."""
    for file, line_no, record in documents:
        check_record(file, line_no, record, json_key)
        yield file, line_no, record


def _errors_in_order(documents: Iterable) -> Iterator:
    """``documents``, with a DataError raised while producing them turned into a final item (its
    message): the error then reaches the writer in input order, after the results of the records
    before it, with or without worker processes, so the first bad record is the one reported."""
    try:
        yield from documents
    except DataError as err:
        yield str(err)


_worker_state: dict = {}

BATCH_DOCUMENTS = 64
"""Documents encoded together: one tokenizer call (``encode_batch``) and, with worker processes,
one task for a worker and one message back."""


def _init_worker(
    encoder, tokenizer_spec: str, eod_token: Optional[str], layout: VocabLayout, json_key: str, pool: bool = False
) -> None:
    """Set up this process to encode documents with ``encoder`` (``encode`` and ``encode_batch``: the
    tokenizer, or its :meth:`encoder` sent to a worker), or else with the tokenizer loaded here."""
    if pool:
        # The other workers take the other cores: the tokenizer's own thread pool would only
        # oversubscribe them (unless the user asked for it).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker_state.update(
        tokenizer=encoder if encoder is not None else load_tokenizer(tokenizer_spec, eod_token),
        layout=layout,
        json_key=json_key,
        text_id=MODALITIES.index("text"),
        dtype=token_dtype(layout.size),
    )


def _codes(file, line_no, n: int, name: str, tokens: list, rng) -> np.ndarray | str:
    """A segment's codebook ids as an array, or the error message: each must be an int (not a
    float such as 3.0, nor a boolean) with ``0 <= id < codebook size``, checked before numpy sees
    them, which would truncate floats and overflow on huge ids."""
    for i, t in enumerate(tokens):
        if type(t) is not int:
            return _record_error(
                file,
                line_no,
                f"segment {n}: {name} token {json.dumps(t)} (item {i} of "
                "'tokens') is not an integer: codebook ids must be written as integers "
                "(3, not 3.0 or true)",
            )
    if tokens and (min(tokens) < 0 or max(tokens) >= rng.codebook_size):
        bad = next(t for t in tokens if not 0 <= t < rng.codebook_size)
        return _record_error(
            file,
            line_no,
            f"segment {n}: {name} token {bad} is outside the codebook "
            f"[0, {rng.codebook_size}) set by --codebook {name}={rng.codebook_size}",
        )
    return np.asarray(tokens, dtype=np.int64)


def _segments(record: dict) -> list:
    """A checked record's segments: its ``segments``, or its text as one text segment."""
    json_key = _worker_state["json_key"]
    text = [{"modality": "text", "text": record[json_key]}] if json_key in record else []
    return record.get("segments") or text


def _texts(record: dict) -> List[str]:
    """The texts a record's document tokenizes, in order."""
    return [seg.get("text", "") for seg in _segments(record) if seg.get("modality", "text") == "text"]


def _encode(item, text_ids: Optional[List[List[int]]] = None):
    """(tokens, modality ids) of one document, None for an empty one, or an error string naming
    file and line (a string, not an exception, so that it reaches the writer in input order).

    ``text_ids``: the ids of the document's texts (:func:`_texts`), already tokenized by
    :func:`_encode_batch`; without them each text is tokenized here, one call each (the reference
    that the batched path must equal)."""
    if isinstance(item, str):  # an error met while reading the input (see _errors_in_order)
        return item
    file, line_no, record = item
    try:
        return _encode_record(file, line_no, record, text_ids)
    except Exception as err:  # e.g. text the tokenizer cannot take: report where, not a bare traceback
        return _record_error(file, line_no, f"could not encode the document ({type(err).__name__}: {err})")


def _encode_batch(items: list) -> list:
    """:func:`_encode` of each item, the texts of all of them tokenized in one ``encode_batch`` call.
    Should that call fail (a text the tokenizer cannot take), the items are encoded one by one,
    which names the document at fault."""
    documents = [item for item in items if not isinstance(item, str)]
    texts = [_texts(record) for _, _, record in documents]
    try:
        flat = _worker_state["tokenizer"].encode_batch([text for doc in texts for text in doc])
    except Exception:
        return [_encode(item) for item in items]
    results, start = [], 0
    for item in items:
        if isinstance(item, str):
            results.append(item)
            continue
        count = len(_texts(item[2]))
        results.append(_encode(item, flat[start : start + count]))
        start += count
    return results


def _encode_record(file, line_no, record, text_ids: Optional[List[List[int]]] = None):
    tok, layout, text_id = _worker_state["tokenizer"], _worker_state["layout"], _worker_state["text_id"]
    pieces: List[List[int]] = []
    runs: List[Tuple[int, int]] = []  # (modality id, length) of each piece, in order
    texts = iter(text_ids) if text_ids is not None else None
    for n, seg in enumerate(_segments(record)):
        name = seg.get("modality", "text")
        if name == "text":
            piece = next(texts) if texts is not None else tok.encode(seg.get("text", ""))
            pieces.append(piece)
            runs.append((text_id, len(piece)))
            continue
        try:
            rng = layout.modality(name)
        except KeyError:
            return _record_error(
                file,
                line_no,
                f"segment {n}: modality {name!r} has no codebook in this run "
                f"(has: {', '.join(m.name for m in layout.modalities) or 'none'})",
                f"pass --codebook {name}=SIZE, or fix or remove {_the_record(line_no)}, and run again",
            )
        codes = _codes(file, line_no, n, name, seg.get("tokens", []), rng)
        if isinstance(codes, str):
            return codes
        piece = [rng.begin] + (codes + rng.offset).tolist() + [rng.end]
        pieces.append(piece)
        runs.append((MODALITIES.index(name), len(piece)))
    length = sum(count for _, count in runs)
    if length == 0:
        return None
    # [length + 1]: the pieces, then EOD (a text token), in the output's token dtype
    ids = np.fromiter(itertools.chain(*pieces, (layout.eod,)), dtype=_worker_state["dtype"], count=length + 1)
    mods = np.repeat(np.array([m for m, _ in runs] + [text_id], dtype=np.uint8), [count for _, count in runs] + [1])
    return ids, mods


def _batches(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch


@dataclass
class PreprocessSummary:
    documents: int = 0
    skipped_empty: int = 0
    tokens: int = 0
    tokens_per_modality: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def documents_per_second(self) -> float:
        return self.documents / self.seconds if self.seconds > 0 else 0.0


def build_manifest(
    layout: dict,
    documents: int,
    tokens: int,
    tokens_per_modality: Dict[str, int],
    max_token_id: int,
    dtype: str,
    sources: List[str],
    shard: Shard = Shard(),
) -> dict:
    """The manifest of a prefix, the one place its fields and their order are defined (a merged
    output's manifest must equal that of one process byte for byte). ``shard`` is recorded only
    for a part of a sharded job, so that the merge can check it has every part."""
    manifest = {
        "format_version": MANIFEST_VERSION,
        "vocab": layout,
        "documents": documents,
        "tokens": tokens,
        "tokens_per_modality": tokens_per_modality,
        "max_token_id": max_token_id,
        "dtype": dtype,
        "sources": sources,
    }
    if shard.count > 1:
        manifest["shard"] = {"index": shard.index, "count": shard.count}
    return manifest


def move_into_place(tmp: dict, out: dict) -> None:
    """Move a finished output's temporaries (:func:`~megatron_ext.data.indexed.paths` + ``.tmp``)
    into place. The manifest marks a complete output: the old one is dropped first, so that a run
    stopped between the moves leaves an output refused as incomplete, not a manifest describing
    other data; the new manifest is moved in last."""
    out["manifest"].unlink(missing_ok=True)
    for key in ("bin", "idx", "modality_bin", "modality_idx", "manifest"):
        tmp[key].replace(out[key])


def discard_partial(builders: Sequence, tmp: dict) -> None:
    """After a failure: close the builders' files and remove the temporaries, so that nothing
    partial is left beside the output (the previous output, if any, stays as it was)."""
    for builder in builders:
        builder.data_file.close()
    for p in tmp.values():
        p.unlink(missing_ok=True)


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer_spec: str,
    codebooks: Optional[Dict[str, int]] = None,
    workers: int = 1,
    json_key: str = "text",
    progress: bool = True,
    documents: Optional[Iterable[Tuple[str, int, dict]]] = None,
    eod_token: Optional[str] = None,
    shard: Shard = Shard(),
) -> PreprocessSummary:
    """Tokenize ``inputs`` (or the given ``documents``) into ``output_prefix`` + manifest.

    ``inputs``: ``.jsonl`` / text files, parquet files, saved ``datasets`` directories or quoted
    globs of them (:mod:`megatron_ext.data.sources`); ``json_key`` names the text field or column.
    ``tokenizer_spec``: ``bytes``, a tokenizer JSON file or a HF tokenizer directory
    (:func:`~megatron_ext.data.tokenizers.load_tokenizer`); every document ends with the tokenizer's
    end-of-document id, or that of ``eod_token``. A tokenizer that cannot be loaded or has no such
    token, an input that is missing or unreadable, and a table without the text column are refused
    before any document is read.

    ``shard``: this process's part of a job split over several (:class:`~megatron_ext.data.sources.Shard`);
    its output is one part for :func:`megatron_ext.data.merge.merge`. A part may hold no document
    (more shards than records); it is written all the same, so that the merge finds every part.

    Every record is checked (shape, UTF-8, integer codebook ids inside their codebook); the first
    bad one stops the run with a DataError naming its file and line (or row), the same with any
    number of workers. Output is written to ``*.tmp`` files and moved into place only once complete;
    on any error the temporaries are removed, so a failed run leaves neither partial files nor a
    damaged previous output behind.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_spec, eod_token)
    layout = VocabLayout.build(
        tokenizer.identity, tokenizer.vocab_size, require_eod(tokenizer, tokenizer_spec), codebooks or {}
    )
    if documents is not None:
        if shard.count > 1:
            raise ValueError("preprocess: given documents cannot be sharded; pass inputs instead")
        docs, total = _checked(documents, json_key), None
    else:
        records, total = shard_records(open_sources(inputs, json_key), shard)
        docs = _checked(records, json_key)
    out = paths(output_prefix)
    out["bin"].parent.mkdir(parents=True, exist_ok=True)
    tmp = {k: v.with_name(v.name + ".tmp") for k, v in out.items()}
    summary = PreprocessSummary(tokens_per_modality={m: 0 for m in MODALITIES})
    modality_counts = np.zeros(len(MODALITIES), dtype=np.int64)
    max_id = -1
    docs = _errors_in_order(docs)
    builders = []
    pool = bar = None
    try:
        if workers > 1:
            init = (tokenizer.encoder(), tokenizer_spec, eod_token, layout, json_key, True)
            pool = mp.get_context("spawn").Pool(workers, _init_worker, init)
        else:
            _init_worker(tokenizer, tokenizer_spec, eod_token, layout, json_key)
        # Imported once the workers are starting, which they do meanwhile (Megatron-Core takes seconds).
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        tokens_builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=token_dtype(layout.size))
        builders.append(tokens_builder)
        modality_builder = IndexedDatasetBuilder(str(tmp["modality_bin"]), dtype=np.uint8)
        builders.append(modality_builder)
        batches = _batches(docs, BATCH_DOCUMENTS)
        encoded = pool.imap(_encode_batch, batches) if pool else map(_encode_batch, batches)
        for batch in encoded:
            if bar is None:
                # Counts records (empty ones included) against the shard's total where it is known,
                # from the first results on (not while workers start). delay: no bar for a run that
                # ends within a second, nor before the error of an early bad record.
                bar = tqdm(
                    total=total,
                    unit=" docs",
                    disable=not progress,
                    file=sys.stderr,
                    mininterval=1.0,
                    delay=1.0,
                    dynamic_ncols=True,
                )
            for result in batch:
                if isinstance(result, str):
                    raise DataError(result)
                bar.update()
                if result is None:
                    summary.skipped_empty += 1
                    continue
                ids, mods = result
                tokens_builder.add_document(ids, [len(ids)])
                modality_builder.add_document(mods, [len(mods)])
                summary.documents += 1
                summary.tokens += len(ids)
                max_id = max(max_id, int(ids.max()))
                modality_counts += np.bincount(mods, minlength=len(MODALITIES))
                if summary.documents % 1000 == 0:
                    tokens_per_second = summary.tokens / (time.perf_counter() - start)
                    bar.set_postfix_str(f"{tokens_per_second:,.0f} tokens/s", refresh=False)
        summary.tokens_per_modality = {m: int(c) for m, c in zip(MODALITIES, modality_counts)}
        if bar is not None:
            bar.close()
        _close_pool(pool, ok=True)
        pool = None
        if summary.documents == 0 and shard.count == 1:
            raise DataError(f"no documents found in {', '.join(map(str, inputs)) or 'the input'}: the input is empty")
        tokens_builder.finalize(str(tmp["idx"]))
        modality_builder.finalize(str(tmp["modality_idx"]))
        summary.seconds = time.perf_counter() - start
        manifest = build_manifest(
            layout.to_dict(),
            summary.documents,
            summary.tokens,
            summary.tokens_per_modality,
            max_id,
            np.dtype(token_dtype(layout.size)).name,
            [str(p) for p in inputs],
            shard,
        )
        tmp["manifest"].write_text(json.dumps(manifest, indent=1))
    except BaseException:
        if bar is not None:
            bar.close()  # ends the progress line, so that the error starts a line of its own
        _close_pool(pool, ok=False)
        discard_partial(builders, tmp)
        raise
    move_into_place(tmp, out)
    if progress:
        part = f" (shard {shard.index} of {shard.count})" if shard.count > 1 else ""
        print(
            f"{summary.documents:,} documents{part}, {summary.tokens:,} tokens in {summary.seconds:.1f} s "
            f"({summary.documents_per_second:,.0f} documents/s, {summary.tokens_per_second:,.0f} tokens/s)",
            file=sys.stderr,
        )
    return summary


def _close_pool(pool, ok: bool) -> None:
    """Close the worker pool: wait for it after success; after an error stop it at once rather
    than let it encode the rest of the input, whose results nobody will read."""
    if pool is None:
        return
    if ok:
        pool.close()
    else:
        pool.terminate()
    pool.join()
