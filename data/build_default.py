"""Build (once) the built-in corpus: Python standard-library text + scikit-learn digit images.

    python -m data.build_default [--cache-dir data/cache]
"""

import argparse
import json
import sys
from pathlib import Path

from megatron_ext.data.default_corpus import ensure_default_corpus


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default="data/cache")
    args = parser.parse_args(argv)
    prefix = ensure_default_corpus(args.cache_dir)
    print(prefix)
    summary = Path(prefix).parent / "summary.json"
    if summary.is_file():
        print(json.dumps(json.loads(summary.read_text()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
