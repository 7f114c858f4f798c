"""HF checkpoints in and out.

    python -m pretrain.hf import --hf-dir DIR --output RUN_DIR [--config CFG]
    python -m pretrain.hf export --run-dir RUN [--step N] --output DIR

import: the model (and MoE / sliding-window) sections come from DIR's config.json (checked against
CFG's where CFG sets them; CFG supplies every other section); writes RUN_DIR/config.yaml,
RUN_DIR/tokenizer/ and a step-0 checkpoint that loads at any TP / PP / EP layout
(``train.init_from: RUN_DIR``, or ``python -m pretrain.train --config RUN_DIR/config.yaml
--run-dir RUN_DIR``). Supported: Llama, Qwen3, Qwen3-MoE, dots1 and this project's hybrid exports.

export: writes DIR loadable by ``transformers.AutoModelForCausalLM.from_pretrained(DIR)``: dense as
Qwen3 (Llama without QK-norm), MoE as Qwen3-MoE (softmax routing) or dots1 (sigmoid + expert bias
+ shared experts), a layer-wise hybrid via ``layer_types`` + ``sliding_window``; a KV-head-wise
hybrid with this project's ``modeling_hybrid.py`` (``trust_remote_code=True``). Export elastic
sub-models after ``python -m pretrain.extract``. Runs in one process on CPU. DIR must be new, empty,
or an earlier export, whose own files alone are replaced (anything else in it stays); a directory
holding anything else is refused before any work.
"""

import argparse
import sys
from pathlib import Path

from megatron_ext.config import ConfigError
from megatron_ext.parallel import ParallelSizes
from megatron_ext.parallel.state import parallel_job


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF directory -> run directory")
    imp.add_argument("--hf-dir", required=True, type=Path)
    imp.add_argument("--output", required=True, type=Path)
    imp.add_argument("--config", type=Path, default=None, help="run config supplying the other sections")
    exp = commands.add_parser("export", help="checkpoint -> HF directory")
    exp.add_argument("--run-dir", required=True, type=Path)
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    exp.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)

    from megatron_ext.training.hf import export_hf, import_hf

    with parallel_job(ParallelSizes()):
        try:
            if args.command == "import":
                print(f"wrote {import_hf(args.hf_dir, args.output, args.config)}")
            else:
                print(f"wrote {export_hf(args.run_dir, args.output, args.step)}")
        except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
