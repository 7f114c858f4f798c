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
from megatron_ext.data.tokenizers import load_tokenizer
from megatron_ext.data.vocab import MODALITIES, VocabLayout


def iter_documents(files: Sequence[str | Path], json_key: str = "text") -> Iterator[Tuple[str, int, dict]]:
    """Yield ``(file, line number, record)`` for every document of the input files."""
    for file in files:
        file = Path(file)
        if not file.is_file():
            raise DataError(f"{file}: input file not found")
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if file.suffix == ".jsonl":
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{file}:{line_no}: not valid JSON ({err.msg})") from None
                    if "segments" not in record and json_key not in record:
                        raise DataError(f"{file}:{line_no}: a record needs {json_key!r} or 'segments'")
                    yield str(file), line_no, record
                else:
                    yield str(file), line_no, {json_key: line.rstrip("\n")}


_worker_state: dict = {}


def _init_worker(tokenizer_spec: str, layout: VocabLayout, json_key: str) -> None:
    _worker_state.update(tokenizer=load_tokenizer(tokenizer_spec), layout=layout, json_key=json_key,
                         text_id=MODALITIES.index("text"))


def _encode(item: Tuple[str, int, dict]):
    """(tokens, modality ids) of one document, or an error string naming file and line."""
    file, line_no, record = item
    tok, layout, text_id = _worker_state["tokenizer"], _worker_state["layout"], _worker_state["text_id"]
    segments = record.get("segments") or [{"modality": "text", "text": record[_worker_state["json_key"]]}]
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
        except KeyError as err:
            return f"{file}:{line_no}: segment {n}: {err.args[0]}"
        codes = np.asarray(seg.get("tokens", []), dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= rng.codebook_size):
            bad = int(codes[(codes < 0) | (codes >= rng.codebook_size)][0])
            return (f"{file}:{line_no}: segment {n}: {name} token {bad} is outside the codebook "
                    f"[0, {rng.codebook_size})")
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
) -> PreprocessSummary:
    """Tokenize ``inputs`` (or the given ``documents``) into ``output_prefix`` + manifest."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_spec)
    layout = VocabLayout.build(tokenizer.identity, tokenizer.vocab_size, tokenizer.eod, codebooks or {})
    out = paths(output_prefix)
    out["bin"].parent.mkdir(parents=True, exist_ok=True)
    tmp = {k: v.with_name(v.name + ".tmp") for k, v in out.items()}
    tokens_builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=token_dtype(layout.size))
    modality_builder = IndexedDatasetBuilder(str(tmp["modality_bin"]), dtype=np.uint8)
    summary = PreprocessSummary(tokens_per_modality={m: 0 for m in MODALITIES})
    max_id = -1
    docs = documents if documents is not None else iter_documents(inputs, json_key)
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_spec, layout, json_key)) if workers > 1 else None
    if pool is None:
        _init_worker(tokenizer_spec, layout, json_key)
    try:
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
                print(f"\r{summary.documents:,} documents, {summary.tokens:,} tokens ({rate:,.0f} tokens/s)",
                      end="", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if summary.documents == 0:
        for p in tmp.values():
            p.unlink(missing_ok=True)
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
    for key in ("bin", "idx", "modality_bin", "modality_idx", "manifest"):  # manifest last: it marks completion
        tmp[key].replace(out[key])
    if progress:
        print(f"\r{summary.documents:,} documents, {summary.tokens:,} tokens in {summary.seconds:.1f} s "
              f"({summary.tokens_per_second:,.0f} tokens/s)", file=sys.stderr)
    return summary
