"""The data tools' command lines (``python -m data.preprocess`` / ``data.train_tokenizer`` /
``data.build_default``, and ``megatron-ext preprocess`` / ``train-tokenizer`` / ``build-default-corpus``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_ext.data.default_corpus import ensure_default_corpus
from megatron_ext.data.indexed import DataError
from megatron_ext.data.preprocess import iter_documents, preprocess
from megatron_ext.data.tokenizers import train_bpe

PREPROCESS_USAGE = """Preprocess JSONL / text documents into Megatron indexed datasets with a modality stream.

    python -m data.preprocess --input docs.jsonl [more.jsonl ...] --output-prefix out/corpus \\
        --tokenizer bytes|path/to/tokenizer.json|path/to/hf_tokenizer_dir [--eod-token TOKEN] \\
        [--codebook image=8192 --codebook audio=4096] [--workers 4] [--json-key text]

Writes out/corpus.{bin,idx}, out/corpus.modality.{bin,idx} and out/corpus.manifest.json. A HF
tokenizer directory (save_pretrained output: BPE, SentencePiece or tiktoken-based) is loaded with
transformers.AutoTokenizer; every document ends with the tokenizer's eos token (<|endoftext|> in a
tokenizer .json file) unless --eod-token names another.
"""


def preprocess_main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=PREPROCESS_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl or .txt files")
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
    parser.add_argument("--json-key", default="text")
    args = parser.parse_args(argv)
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
            args.json_key,
            eod_token=args.eod_token,
        )
    except (DataError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    per_modality = ", ".join(f"{k} {v:,}" for k, v in summary.tokens_per_modality.items() if v)
    print(
        f"{summary.documents:,} documents ({summary.skipped_empty} empty skipped), {summary.tokens:,} tokens "
        f"({per_modality}) in {summary.seconds:.1f} s = {summary.tokens_per_second:,.0f} tokens/s"
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
        description=TRAIN_TOKENIZER_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
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
        description=BUILD_DEFAULT_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", default="data/cache")
    args = parser.parse_args(argv)
    prefix = ensure_default_corpus(args.cache_dir)
    print(prefix)
    summary = Path(prefix).parent / "summary.json"
    if summary.is_file():
        print(json.dumps(json.loads(summary.read_text()), indent=1))
    return 0
