"""A validation set of its own (``data.valid_paths``, Megatron-LM's ``--valid-data-path``): all of
``data.paths`` trains, validation reads the validation prefixes alone (blended by
``data.valid_weights``), the pre-training checks cover them, and contradictory settings are refused.

The training documents are lowercase and the validation documents uppercase, so the bytes of a
sample say which prefix it came from."""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.data.preprocess import preprocess
from megatron_ext.run import RunConfig, check_run
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

VOCAB = 264  # the bytes tokenizer's 257 ids, rounded up
LOWER, UPPER = set(range(ord("a"), ord("z") + 1)), set(range(ord("A"), ord("Z") + 1))


def prefix(tmp_path: Path, name: str, upper: bool, documents: int = 40, tokenizer: str = "bytes") -> str:
    """``documents`` short text documents of lowercase (or uppercase) words, preprocessed."""
    words = [f"word{i} of document" for i in range(documents)]
    docs = tmp_path / f"{name}.jsonl"
    docs.write_text("".join(json.dumps({"text": (w.upper() if upper else w) * 3}) + "\n" for w in words))
    preprocess([docs], tmp_path / name, tokenizer, progress=False)
    return str(tmp_path / name)


def config(tmp_path: Path, paths, valid_paths, **data):
    return merge(
        TINY,
        {
            "model": {"vocab_size": VOCAB},
            "data": {
                "kind": "indexed",
                "paths": paths,
                "valid_paths": valid_paths,
                "cache_dir": str(tmp_path / "cache"),
                **data,
            },
            "train": {"steps": 2, "eval_interval": 2, "eval_steps": 1},
        },
    )


def train_and_inspect(run_dir, cfg):
    """(metrics records of a run, then of the datasets the run builds: [(prefix, documents it uses,
    documents it has)] of the training set and of each part of the validation blend, and the ids of
    every training and validation sample)."""
    from megatron_ext.run.datasets import build_datasets
    from megatron_ext.training.loop import Trainer

    Trainer(from_dict(RunConfig, cfg), Path(run_dir), log=lambda line: None).run()
    train, valid = build_datasets(from_dict(RunConfig, cfg))

    def parts(dataset):
        return [(d.dataset_path, len(d.indices), len(d.dataset)) for d in getattr(dataset, "datasets", [dataset])]

    def tokens(dataset):
        return set(np.concatenate([dataset[i]["tokens"].numpy() for i in range(len(dataset))]).tolist())

    return read_metrics(Path(run_dir) / "metrics.jsonl"), parts(train), parts(valid), tokens(train), tokens(valid)


def test_validation_reads_only_the_validation_prefixes_and_all_of_paths_trains(tmp_path):
    train = prefix(tmp_path, "train", upper=False)
    valid_a, valid_b = prefix(tmp_path, "valid_a", upper=True), prefix(tmp_path, "valid_b", upper=True, documents=20)
    cfg = config(tmp_path, [train], [valid_a, valid_b], valid_weights=[1.0, 3.0])
    check_run(from_dict(RunConfig, cfg), 1, cuda=False)
    records, train_parts, valid_parts, train_ids, valid_ids = run_distributed(
        train_and_inspect, 1, None, run_dir=str(tmp_path / "run"), cfg=cfg
    )[0]
    # No split share is carved out: the training set uses every document of its prefix.
    assert train_parts == [(train, 40, 40)]
    assert sorted(valid_parts) == [(valid_a, 40, 40), (valid_b, 20, 20)]
    assert valid_ids & UPPER and not valid_ids & LOWER
    assert train_ids & LOWER and not train_ids & UPPER
    assert [r["step"] for r in records] == [1, 2] and np.isfinite(records[-1]["val/loss"])


def test_contradictory_validation_settings_are_refused():
    def refused(data, message):
        with pytest.raises(ConfigError, match=message):
            from_dict(RunConfig, {"data": data})

    indexed = {"kind": "indexed", "paths": ["train"]}
    refused({**indexed, "valid_weights": [1.0]}, r"data.valid_weights=\[1.0\] weighs no prefixes")
    refused({**indexed, "valid_paths": ["v"], "valid_weights": [1.0, 2.0]}, "valid_weights has 2 entries for 1")
    refused({**indexed, "valid_paths": ["v"], "valid_weights": [-1.0]}, "valid_weights=.* must not be negative")
    refused({**indexed, "valid_paths": ["v"], "split": "98,2,0"}, "data.split='98,2,0' gives validation or test")
    refused({**indexed, "valid_paths": ["./train"]}, r"data.valid_paths lists \['train'\], which paths also lists")
    refused({"kind": "synthetic", "valid_paths": ["v"]}, "data.valid_paths=.* needs kind 'indexed'")
    cfg = from_dict(RunConfig, {"data": {**indexed, "valid_paths": ["v"], "split": "100,0,0"}})
    assert cfg.data.paths_split is None
    assert from_dict(RunConfig, {"data": indexed}).data.paths_split == "98,2,0"


def test_validation_prefixes_are_checked_before_training(tmp_path):
    from megatron_ext.data.tokenizers import train_bpe

    train = prefix(tmp_path, "train", upper=False)
    bpe = str(train_bpe(["SOME UPPERCASE WORDS"] * 20, 300, tmp_path / "tok.json").path)
    other_tokenizer = prefix(tmp_path, "bpe", upper=True, tokenizer=bpe)
    cfg = config(tmp_path, [train], [str(tmp_path / "missing"), other_tokenizer], tokenizer="bytes")
    cfg = merge(cfg, {"model": {"vocab_size": 320}})  # room for either tokenizer: only the identity differs
    with pytest.raises(ConfigError) as err:
        check_run(from_dict(RunConfig, cfg), 1, cuda=False)
    problems = str(err.value)
    assert "data.valid_paths: " in problems and "missing" in problems, problems
    assert f"data.valid_paths: {other_tokenizer}.manifest.json: tokenized with" in problems, problems
    small = prefix(tmp_path, "small", upper=True, documents=1)
    cfg = config(tmp_path, [train], [small])
    with pytest.raises(ConfigError, match=r"but data.valid_paths holds about \d+: give data.valid_paths more"):
        check_run(from_dict(RunConfig, cfg), 1, cuda=False)
