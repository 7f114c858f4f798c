"""A HF tokenizer directory end to end: preprocess with ``--tokenizer DIR``, train a few steps with
``data.tokenizer: DIR`` (its identity checked against the data), and generate: ``pretrain.generate``
encodes the prompt and decodes the continuation with the same tokenizer. For a byte-level BPE saved
by ``save_pretrained`` and for a SentencePiece ``tokenizer.model``."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.config import from_dict
from megatron_ext.data.cli import preprocess_main
from megatron_ext.data.indexed import check_prefix
from megatron_ext.data.tokenizers import load_tokenizer
from megatron_ext.inference.generate import run_tokenizer
from megatron_ext.run import RunConfig, load_config
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge
from tests.tiny_tokenizers import corpus, hf_bpe_dir, sentencepiece_dir

REPO = Path(__file__).resolve().parents[2]
BUILDERS = {"bpe": hf_bpe_dir, "sentencepiece": sentencepiece_dir}


def train(run_dir, cfg):
    from megatron_ext.training.loop import Trainer

    Trainer(from_dict(RunConfig, cfg), Path(run_dir), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_preprocess_train_and_generate_with_a_tokenizer_directory(kind, tmp_path):
    tokenizer = BUILDERS[kind](tmp_path / "tokenizer")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus(200)))
    prefix = tmp_path / "corpus"
    assert preprocess_main(["--input", str(docs), "--output-prefix", str(prefix), "--tokenizer", str(tokenizer)]) == 0
    tok = load_tokenizer(str(tokenizer))
    assert check_prefix(prefix)["vocab"]["tokenizer"] == tok.identity

    cfg = merge(
        TINY,
        {
            "model": {"vocab_size": 320},
            "data": {"kind": "indexed", "paths": [str(prefix)], "tokenizer": str(tokenizer)},
            "train": {"steps": 3},
        },
    )
    records = run_distributed(train, 1, None, run_dir=str(tmp_path / "run"), cfg=cfg)[0]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)

    # Generation encodes the prompt and decodes with run_tokenizer: this directory, as preprocessing read it.
    decoding = run_tokenizer(load_config(tmp_path / "run" / "config.yaml"), tmp_path / "run")
    assert (decoding.identity, decoding.eod) == (tok.identity, tok.eod)
    if kind == "sentencepiece":
        return  # the command itself is the same for either kind: run it once
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.generate",
            "--run-dir",
            str(tmp_path / "run"),
            "--prompt",
            "the model trains",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]
    assert "Warning" not in out.stderr, out.stderr
