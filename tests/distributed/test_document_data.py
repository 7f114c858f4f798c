"""The data side of document masking: ``data.reset_attention_mask`` / ``reset_position_ids`` /
``eod_mask_loss`` reach Megatron's dataset, samples carry their document starts, a run trains with
them (a hybrid with sliding-window units included), and data without an EOD is refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.data.indexed import DataError
from megatron_ext.data.preprocess import preprocess
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge
from tests.distributed.test_megatron_prefix import write_megatron_prefix

VOCAB = 264  # the bytes tokenizer's 257 ids, rounded up
EOD = 256  # the bytes tokenizer's
FLAGS = {"reset_attention_mask": True, "reset_position_ids": True, "eod_mask_loss": True}


def prefix(tmp_path: Path) -> str:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc {i} " * (i % 4 + 1)}) + "\n" for i in range(80)))
    preprocess([docs], tmp_path / "docs", "bytes", progress=False)
    return str(tmp_path / "docs")


def samples(paths, cache, documents, count=12):
    from megatron_ext.data.gpt_dataset import build_gpt_datasets

    (train, _, _), _ = build_gpt_datasets(
        paths, None, "100,0,0", 32, 5, [count, 0, 0], cache, VOCAB, None, documents=documents
    )
    return [train[i] for i in range(count)]


def test_samples_carry_megatrons_document_fields(tmp_path):
    from megatron_ext.models.documents import document_starts

    path = prefix(tmp_path)
    plain = run_distributed(samples, 1, paths=[path], cache=str(tmp_path / "c0"), documents=None)[0]
    flagged = run_distributed(samples, 1, paths=[path], cache=str(tmp_path / "c1"), documents=FLAGS)[0]
    boundaries = 0
    for before, sample in zip(plain, flagged):
        tokens = sample["tokens"]
        assert torch.equal(tokens, before["tokens"])  # the same samples, only the fields differ
        starts = sample["document_starts"]
        assert torch.equal(starts, document_starts(tokens[None], EOD)[0])
        assert torch.equal(sample["position_ids"], torch.arange(tokens.numel()) - starts)
        assert torch.equal(sample["loss_mask"], (tokens != EOD).float())  # no loss on the token after an EOD
        assert "document_starts" not in before and torch.equal(before["position_ids"], torch.arange(tokens.numel()))
        boundaries += int((tokens == EOD).sum())
    assert boundaries > 0


def test_document_flags_without_an_eod_are_refused(tmp_path):
    megatron = write_megatron_prefix(tmp_path / "megatron")  # no manifest, read without a tokenizer
    with pytest.raises(DataError, match="data.reset_attention_mask.*set data.tokenizer"):
        samples([megatron], str(tmp_path / "c"), {"reset_attention_mask": True})
    with pytest.raises(ConfigError, match="kind 'synthetic' has none"):
        from_dict(RunConfig, merge(TINY, {"data": {"kind": "synthetic", "eod_mask_loss": True}}))


def test_the_combinations_document_masking_cannot_honour_are_refused():
    from megatron_ext.run import check_run
    from megatron_ext.run.backend import te_unsupported

    cfg = from_dict(
        RunConfig,
        merge(
            TINY, {"data": {"kind": "default", "reset_attention_mask": True}, "model": {"attention_backend": "local"}}
        ),
    )
    with pytest.raises(ConfigError, match="attention_backend: sdpa, which masks documents"):
        check_run(cfg, world_size=1, cuda=False)
    assert any("reset_attention_mask" in reason for reason in te_unsupported(cfg))


def train(run_dir, cfg):
    from megatron_ext.training.loop import Trainer

    Trainer(from_dict(RunConfig, cfg), Path(run_dir), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def test_a_hybrid_trains_on_packed_documents(tmp_path):
    """Document masking, per-document positions and the EOD loss mask through the training loop, with
    sliding-window units (window 5 < documents) and an SGT loop; the loss differs from a run without."""
    path = prefix(tmp_path)
    base = merge(
        TINY,
        {
            "model": {"vocab_size": VOCAB},
            "data": {"kind": "indexed", "paths": [path], "seq_length": 32, "cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 3, "lr": 1.0e-2},
            "hybrid_attention": {"enabled": True, "method": "rule_head", "window": 5, "target": 0.5},
            "looping": {"enabled": True, "top_k_layers": 1, "max_loop_depth": 1, "num_keep_heads": 2},
        },
    )
    masked = run_distributed(train, 1, None, run_dir=str(tmp_path / "masked"), cfg=merge(base, {"data": FLAGS}))[0]
    plain = run_distributed(train, 1, None, run_dir=str(tmp_path / "plain"), cfg=base)[0]
    assert [r["step"] for r in masked] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in masked)
    assert masked[0]["loss"] != plain[0]["loss"]
