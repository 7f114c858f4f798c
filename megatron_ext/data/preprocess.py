"""Documents (JSONL or plain text) -> token and modality streams in Megatron's indexed format.

Input records, one per line of a ``.jsonl`` file::

    {"text": "a plain text document"}
    {"segments": [{"modality": "text", "text": "a caption"},
                  {"modality": "image", "tokens": [3, 0, 16, ...]}]}   # codebook indices

or, for a ``.txt`` file, one document per non-empty line. Text is tokenized; a segment of modality
m becomes ``m.begin, m.offset + codes..., m.end``; every document ends with EOD. Documents are
encoded by worker processes and written in input order, so the output does not depend on the
number of workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.data.indexed import MANIFEST_VERSION, DataError, paths, token_dtype
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


def _record_error(file, line_no, problem: str, fix: str = "") -> str:
    """The message for one bad input record: where it is (``file:line:``, as editors read it, and
    the line spelled out), what is wrong with it and what to do about it."""
    fix = fix or f"fix or remove the record on line {line_no} and run again"
    return f"{file}:{line_no}: {problem}; {fix}"


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
        file = Path(file)
        if not file.is_file():
            raise DataError(f"{file}: input file not found")
        # surrogateescape: a bad byte fails on its own line (see _decoded), not in a read-ahead block.
        with open(file, encoding="utf-8", errors="surrogateescape") as f:
            for line_no, line in enumerate(f, 1):
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


def _init_worker(tokenizer_spec: str, eod_token: Optional[str], layout: VocabLayout, json_key: str) -> None:
    _worker_state.update(
        tokenizer=load_tokenizer(tokenizer_spec, eod_token),
        layout=layout,
        json_key=json_key,
        text_id=MODALITIES.index("text"),
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


def _encode(item):
    """(tokens, modality ids) of one document, None for an empty one, or an error string naming
    file and line (a string, not an exception, so that it reaches the writer in input order)."""
    if isinstance(item, str):  # an error met while reading the input (see _errors_in_order)
        return item
    file, line_no, record = item
    try:
        return _encode_record(file, line_no, record)
    except Exception as err:  # e.g. text the tokenizer cannot take: report where, not a bare traceback
        return _record_error(file, line_no, f"could not encode the document ({type(err).__name__}: {err})")


def _encode_record(file, line_no, record):
    tok, layout, text_id = _worker_state["tokenizer"], _worker_state["layout"], _worker_state["text_id"]
    json_key = _worker_state["json_key"]
    text = [{"modality": "text", "text": record[json_key]}] if json_key in record else []
    segments = record.get("segments") or text
    ids: List[int] = []
    mods: List[int] = []
    for n, seg in enumerate(segments):
        name = seg.get("modality", "text")
        if name == "text":
            piece = tok.encode(seg.get("text", ""))
            ids += piece
            mods += [text_id] * len(piece)
            continue
        try:
            rng = layout.modality(name)
        except KeyError:
            return _record_error(
                file,
                line_no,
                f"segment {n}: modality {name!r} has no codebook in this run "
                f"(has: {', '.join(m.name for m in layout.modalities) or 'none'})",
                f"pass --codebook {name}=SIZE, or fix or remove the record on line {line_no}, and run again",
            )
        codes = _codes(file, line_no, n, name, seg.get("tokens", []), rng)
        if isinstance(codes, str):
            return codes
        piece = [rng.begin] + (codes + rng.offset).tolist() + [rng.end]
        ids += piece
        mods += [MODALITIES.index(name)] * len(piece)
    if not ids:
        return None
    ids.append(layout.eod)
    mods.append(text_id)
    return np.asarray(ids, dtype=np.int64), np.asarray(mods, dtype=np.uint8)


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
) -> PreprocessSummary:
    """Tokenize ``inputs`` (or the given ``documents``) into ``output_prefix`` + manifest.

    ``tokenizer_spec``: ``bytes``, a tokenizer JSON file or a HF tokenizer directory
    (:func:`~megatron_ext.data.tokenizers.load_tokenizer`); every document ends with the tokenizer's
    end-of-document id, or that of ``eod_token``. A tokenizer that cannot be loaded or has no such
    token is refused before any input is read.

    Every record is checked (shape, UTF-8, integer codebook ids inside their codebook); the first
    bad one stops the run with a DataError naming its file and line, the same with any number of
    workers. Output is written to ``*.tmp`` files and moved into place only once complete; on any
    error the temporaries are removed, so a failed run leaves neither partial files nor a damaged
    previous output behind.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_spec, eod_token)
    layout = VocabLayout.build(
        tokenizer.identity, tokenizer.vocab_size, require_eod(tokenizer, tokenizer_spec), codebooks or {}
    )
    out = paths(output_prefix)
    out["bin"].parent.mkdir(parents=True, exist_ok=True)
    tmp = {k: v.with_name(v.name + ".tmp") for k, v in out.items()}
    summary = PreprocessSummary(tokens_per_modality={m: 0 for m in MODALITIES})
    max_id = -1
    docs = _checked(documents, json_key) if documents is not None else iter_documents(inputs, json_key)
    docs = _errors_in_order(docs)
    builders = []
    pool = None
    try:
        tokens_builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=token_dtype(layout.size))
        builders.append(tokens_builder)
        modality_builder = IndexedDatasetBuilder(str(tmp["modality_bin"]), dtype=np.uint8)
        builders.append(modality_builder)
        if workers > 1:
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_spec, eod_token, layout, json_key))
        else:
            _init_worker(tokenizer_spec, eod_token, layout, json_key)
        encoded = pool.imap(_encode, docs, chunksize=64) if pool else map(_encode, docs)
        for result in encoded:
            if isinstance(result, str):
                raise DataError(result)
            if result is None:
                summary.skipped_empty += 1
                continue
            ids, mods = result
            tokens_builder.add_document(ids, [len(ids)])
            modality_builder.add_document(mods, [len(mods)])
            summary.documents += 1
            summary.tokens += len(ids)
            max_id = max(max_id, int(ids.max()))
            for m, count in zip(*np.unique(mods, return_counts=True)):
                summary.tokens_per_modality[MODALITIES[m]] += int(count)
            if progress and summary.documents % 1000 == 0:
                rate = summary.tokens / (time.perf_counter() - start)
                print(
                    f"\r{summary.documents:,} documents, {summary.tokens:,} tokens ({rate:,.0f} tokens/s)",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        _close_pool(pool, ok=True)
        pool = None
        if summary.documents == 0:
            raise DataError(f"no documents found in {', '.join(map(str, inputs)) or 'the input'}: the input is empty")
        tokens_builder.finalize(str(tmp["idx"]))
        modality_builder.finalize(str(tmp["modality_idx"]))
        summary.seconds = time.perf_counter() - start
        manifest = {
            "format_version": MANIFEST_VERSION,
            "vocab": layout.to_dict(),
            "documents": summary.documents,
            "tokens": summary.tokens,
            "tokens_per_modality": summary.tokens_per_modality,
            "max_token_id": max_id,
            "dtype": np.dtype(token_dtype(layout.size)).name,
            "sources": [str(p) for p in inputs],
        }
        tmp["manifest"].write_text(json.dumps(manifest, indent=1))
    except BaseException:
        _close_pool(pool, ok=False)
        if progress and summary.documents >= 1000:
            print(file=sys.stderr)  # end the progress line, so that the error starts a line of its own
        for builder in builders:
            builder.data_file.close()
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    # The manifest marks a complete output: drop the old one first, so that a run stopped between
    # the moves below leaves an output that is refused as incomplete, not a manifest describing
    # other data; the new manifest is moved in last.
    out["manifest"].unlink(missing_ok=True)
    for key in ("bin", "idx", "modality_bin", "modality_idx", "manifest"):
        tmp[key].replace(out[key])
    if progress:
        print(
            f"\r{summary.documents:,} documents, {summary.tokens:,} tokens in {summary.seconds:.1f} s "
            f"({summary.tokens_per_second:,.0f} tokens/s)",
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
