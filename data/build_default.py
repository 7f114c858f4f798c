"""`python -m data.build_default`: see megatron_ext/data/cli.py (`--help` prints the usage)."""

import sys

from megatron_ext.data.cli import build_default_main as main

if __name__ == "__main__":
    sys.exit(main())
