"""Train a byte-level BPE tokenizer on your corpus.

    python -m data.train_tokenizer --input docs.jsonl [more.txt ...] --vocab-size 32000 --output tok.json
"""

import argparse
import sys

from megatron_ext.data.indexed import DataError
from megatron_ext.data.preprocess import iter_documents
from megatron_ext.data.tokenizers import train_bpe


def _texts(files, json_key):
    for _, _, record in iter_documents(files, json_key):
        for seg in record.get("segments") or [{"modality": "text", "text": record[json_key]}]:
            if seg.get("modality", "text") == "text":
                yield seg.get("text", "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    sys.exit(main())
