"""The data tools' command lines (``python -m data.preprocess`` / ``data.train_tokenizer`` /
``data.build_default``, and ``megatron-ext preprocess`` / ``train-tokenizer`` / ``build-default-corpus``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_ext.data.default_corpus import ensure_default_corpus
from megatron_ext.data.indexed import DataError
from megatron_ext.data.merge import merge
from megatron_ext.data.preprocess import iter_documents, preprocess
from megatron_ext.data.sources import Shard
from megatron_ext.data.tokenizers import train_bpe

PREPROCESS_USAGE = """Preprocess documents into Megatron indexed datasets with a modality stream.

    python -m data.preprocess --input docs.jsonl [more.jsonl ...] --output-prefix out/corpus \\
        --tokenizer bytes|path/to/tokenizer.json|path/to/hf_tokenizer_dir [--eod-token TOKEN] \\
        [--codebook image=8192 --codebook audio=4096] [--workers 4] [--text-key text] \\
        [--num-shards N --shard-index I]
    python -m data.preprocess merge --inputs out/part-0 out/part-1 ... --output-prefix out/corpus

--input takes .jsonl or .txt files, parquet files, a directory written by HF datasets'
Dataset.save_to_disk, or quoted globs ('shards/*.parquet'); --text-key names the text field or
column. Writes out/corpus.{bin,idx}, out/corpus.modality.{bin,idx} and out/corpus.manifest.json. A
HF tokenizer directory (save_pretrained output: BPE, SentencePiece or tiktoken-based) is loaded
with transformers.AutoTokenizer; every document ends with the tokenizer's eos token
(<|endoftext|> in a tokenizer .json file) unless --eod-token names another.

--num-shards N --shard-index I preprocess the I-th of N contiguous ranges of the input's records
(e.g. one SLURM array task each, I = $SLURM_ARRAY_TASK_ID), each into its own prefix; merge joins
the N prefixes into the output one process would have written, byte for byte.
"""

MERGE_USAGE = """Merge prefixes written by data.preprocess (the shards of a sharded job, in any order, or any
prefixes written with the same tokenizer and codebooks, in the order given) into one.

    python -m data.preprocess merge --inputs out/part-0 out/part-1 out/part-2 --output-prefix out/corpus
"""


def preprocess_main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m data.preprocess",
        description=PREPROCESS_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help=".jsonl, .txt or .parquet files, saved datasets directories, or quoted globs of them",
    )
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer", required=True, help="'bytes', a tokenizer JSON file or a HF tokenizer directory")
    parser.add_argument(
        "--eod-token",
        default=None,
        metavar="TOKEN",
        help="the token that ends every document (default: the tokenizer's eos token)",
    )
    parser.add_argument(
        "--codebook",
        action="append",
        default=[],
        metavar="MODALITY=SIZE",
        help="a non-text modality and its codebook size; repeatable",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--text-key",
        "--json-key",
        dest="text_key",
        default="text",
        help="the JSON field or table column that holds a document's text (default: text)",
    )
    parser.add_argument("--num-shards", type=int, default=1, metavar="N", help="split the job into N parts")
    parser.add_argument(
        "--shard-index", type=int, default=0, metavar="I", help="the part this process writes, 0 <= I < N"
    )
    args = parser.parse_args(argv)
    try:
        shard = Shard(args.shard_index, args.num_shards)
    except ValueError as err:
        parser.error(str(err))
    codebooks = {}
    for item in args.codebook:
        name, _, size = item.partition("=")
        if not size.isdigit():
            parser.error(f"--codebook {item!r}: use MODALITY=SIZE, e.g. image=8192")
        codebooks[name] = int(size)
    try:
        summary = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer,
            codebooks,
            args.workers,
            args.text_key,
            eod_token=args.eod_token,
            shard=shard,
        )
    except (DataError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    per_modality = ", ".join(f"{k} {v:,}" for k, v in summary.tokens_per_modality.items() if v)
    print(
        f"{summary.documents:,} documents ({summary.skipped_empty} empty skipped), {summary.tokens:,} tokens "
        f"({per_modality}) in {summary.seconds:.1f} s = {summary.documents_per_second:,.0f} documents/s, "
        f"{summary.tokens_per_second:,.0f} tokens/s"
    )
    return 0


def merge_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.preprocess merge",
        description=MERGE_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--inputs", nargs="+", required=True, metavar="PREFIX", help="prefixes to merge")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    try:
        manifest = merge(args.inputs, args.output_prefix)
    except (DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.output_prefix}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
        f"from {len(args.inputs)} prefixes"
    )
    return 0


TRAIN_TOKENIZER_USAGE = """Train a byte-level BPE tokenizer on your corpus.

    python -m data.train_tokenizer --input docs.jsonl [more.txt ...] --vocab-size 32000 --output tok.json
"""


def _texts(files, json_key):
    for _, _, record in iter_documents(files, json_key):
        for seg in record.get("segments") or [{"modality": "text", "text": record.get(json_key, "")}]:
            if seg.get("modality", "text") == "text":
                yield seg.get("text", "")


def train_tokenizer_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.train_tokenizer",
        description=TRAIN_TOKENIZER_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--json-key", default="text")
    args = parser.parse_args(argv)
    try:
        tok = train_bpe(_texts(args.input, args.json_key), args.vocab_size, args.output)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"saved {args.output}: {tok.identity} (EOD id {tok.eod})")
    return 0


BUILD_DEFAULT_USAGE = """Build (once) the built-in corpus: Python standard-library text + scikit-learn digit images.

    python -m data.build_default [--cache-dir data/cache]
"""


def build_default_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.build_default",
        description=BUILD_DEFAULT_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache-dir", default="data/cache")
    args = parser.parse_args(argv)
    prefix = ensure_default_corpus(args.cache_dir)
    print(prefix)
    summary = Path(prefix).parent / "summary.json"
    if summary.is_file():
        print(json.dumps(json.loads(summary.read_text()), indent=1))
    return 0
