"""The built-in corpus: built from installed packages, cached, and trained on with per-modality losses."""

from pathlib import Path

from megatron_ext.config import from_dict
from megatron_ext.data.default_corpus import ensure_default_corpus
from megatron_ext.data.indexed import check_prefix
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge


def train_on_default(run_dir, cache_dir):
    cfg = from_dict(
        RunConfig,
        merge(
            TINY,
            {
                "model": {"num_query_groups": None, "vocab_size": 2176},
                "data": {
                    "kind": "default",
                    "seq_length": 64,
                    "cache_dir": cache_dir,
                    "loss_weights": {"text": 1.0, "image": 0.5},
                },
                "train": {"steps": 6, "eval_interval": 6, "eval_steps": 1},
            },
        ),
    )
    Trainer(cfg, Path(run_dir), log=lambda line: None).run()


def test_default_corpus_builds_once_and_trains(tmp_path):
    cache = tmp_path / "cache"
    prefix = ensure_default_corpus(cache)
    manifest = check_prefix(prefix, model_vocab_size=2176)
    stats = manifest["tokens_per_modality"]
    print(f"[corpus] {manifest['documents']} documents, tokens per modality {stats}")
    assert stats["text"] > 500_000 and stats["image"] == 1797 * (64 + 2)
    stamp = Path(prefix + ".manifest.json").stat().st_mtime_ns
    assert ensure_default_corpus(cache) == prefix and Path(prefix + ".manifest.json").stat().st_mtime_ns == stamp

    run_distributed(train_on_default, 1, None, run_dir=str(tmp_path / "run"), cache_dir=str(cache))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 6 and "val/loss" in records[-1]
    assert all("loss/text" in r for r in records)
    assert any("loss/image" in r for r in records), "image tokens must reach training batches"
