"""Preprocess JSONL / text documents into Megatron indexed datasets with a modality stream.

    python -m data.preprocess --input docs.jsonl [more.jsonl ...] --output-prefix out/corpus \\
        --tokenizer bytes|path/to/tokenizer.json [--codebook image=8192 --codebook audio=4096] \\
        [--workers 4] [--json-key text]

Writes out/corpus.{bin,idx}, out/corpus.modality.{bin,idx} and out/corpus.manifest.json.
"""

import argparse
import sys

from megatron_ext.data.indexed import DataError
from megatron_ext.data.preprocess import preprocess


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl or .txt files")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer", required=True, help="'bytes' or a BPE tokenizer JSON file")
    parser.add_argument("--codebook", action="append", default=[], metavar="MODALITY=SIZE",
                        help="a non-text modality and its codebook size; repeatable")
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
        summary = preprocess(args.input, args.output_prefix, args.tokenizer, codebooks, args.workers, args.json_key)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    per_modality = ", ".join(f"{k} {v:,}" for k, v in summary.tokens_per_modality.items() if v)
    print(f"{summary.documents:,} documents ({summary.skipped_empty} empty skipped), {summary.tokens:,} tokens "
          f"({per_modality}) in {summary.seconds:.1f} s = {summary.tokens_per_second:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
