"""``megatron-ext``: every tool of the project under one command, installed by ``pip install``.

    megatron-ext launch --nproc-per-node 2 -m pretrain.train --config configs/smoke.yaml
    megatron-ext train --config ...        (a rank started by torchrun / srun / mpirun)
    megatron-ext evaluate | generate | extract | hf | params | plan | experiment | analyze ...
    megatron-ext preprocess | train-tokenizer | build-default-corpus ...

Each subcommand is the ``python -m`` tool of the same name with the same options (``megatron-ext
SUBCOMMAND --help``); they run from any directory (relative paths are the caller's).
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "launch": ("pretrain.launch", "main", "start the ranks of one node after checking the config (torchrun's options)"),
    "train": ("pretrain.train", "main", "train (one rank; started by a launcher)"),
    "evaluate": ("pretrain.evaluate", "main", "validation loss of a checkpoint, optionally of a sub-network"),
    "generate": ("pretrain.generate", "main", "sample text from a checkpoint with a KV cache"),
    "extract": ("pretrain.extract", "main", "extract an elastic sub-model"),
    "hf": ("pretrain.hf", "main", "import from / export to a Hugging Face model directory"),
    "params": ("pretrain.params", "main", "parameter counts of a config"),
    "plan": ("pretrain.plan", "main", "check a config against a GPU allocation and print the layout"),
    "experiment": ("pretrain.experiment", "main", "run an experiment spec (a table's grid of runs) and report it"),
    "analyze": ("pretrain.analyze", "main", "attention behaviour per layer and KV head of a trained run"),
    "preprocess": ("megatron_ext.data.cli", "preprocess_main", "documents (JSONL, parquet, datasets) to indexed data"),
    "train-tokenizer": ("megatron_ext.data.cli", "train_tokenizer_main", "train a byte-level BPE tokenizer"),
    "build-default-corpus": ("megatron_ext.data.cli", "build_default_main", "build the built-in corpus once"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    return "usage: megatron-ext SUBCOMMAND [options]\n\nsubcommands:\n" + "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, function, _ = SUBCOMMANDS[name]
    sys.argv = [f"megatron-ext {name}", *rest]  # what argparse prints as the program
    return getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    sys.exit(main())
