"""`python -m data.train_tokenizer`: see megatron_ext/data/cli.py (`--help` prints the usage)."""

import sys

from megatron_ext.data.cli import train_tokenizer_main as main

if __name__ == "__main__":
    sys.exit(main())
