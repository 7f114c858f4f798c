"""Megatron-LM's own data, a prefix written by its ``tools/preprocess_data.py`` (``P.bin`` / ``P.idx``
through Megatron-Core's ``IndexedDatasetBuilder``; no manifest, no modality stream), trains as text,
alone or blended with the project's data; ids outside the model's (or the tokenizer's) vocabulary
are refused before training; the id scan is cached beside the files and redone when they change."""

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.data import indexed
from megatron_ext.data.indexed import DataError, check_prefix, scan_cache_path
from megatron_ext.data.preprocess import preprocess
from megatron_ext.run import RunConfig, check_run
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

VOCAB = 264  # the model's: the bytes tokenizer's 257 ids, rounded up
EOD = 256


def write_megatron_prefix(
    prefix: Path, vocab_size: int = 257, extra_id: Optional[int] = None, documents: int = 60
) -> str:
    """What ``tools/preprocess_data.py --append-eod`` writes for a tokenizer of ``vocab_size`` ids:
    Megatron-Core's builder at the tokenizer's optimal dtype, one ``add_document`` per document
    (its sentence lengths: one sentence here) ending with EOD, then ``finalize``. Ids are the bytes
    128..255, which the project's ASCII documents never hold; the last document starts with
    ``extra_id`` when given."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(vocab_size))
    for i in range(documents):
        ids = rng.integers(128, 256, size=int(rng.integers(10, 40))).tolist() + [EOD]
        if i == documents - 1 and extra_id is not None:
            ids[0] = extra_id
        builder.add_document(np.asarray(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def project_prefix(tmp_path: Path) -> str:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * (i % 5 + 2)}) + "\n" for i in range(60)))
    preprocess([docs], tmp_path / "ours", "bytes", progress=False)
    return str(tmp_path / "ours")


def config(paths, **data):
    return merge(
        TINY,
        {
            "model": {"vocab_size": VOCAB},
            "data": {"kind": "indexed", "paths": paths, "split": "90,10,0", **data},
            "train": {"steps": 3},
        },
    )


def train(run_dir, cfg):
    from megatron_ext.training.loop import Trainer

    Trainer(from_dict(RunConfig, cfg), Path(run_dir), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def samples(paths, weights, cache, tokenizer=None, count=48):
    """(layout, [(tokens, modality_ids)] of the first ``count`` training samples) of a blend."""
    from megatron_ext.data.gpt_dataset import build_gpt_datasets
    from megatron_ext.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer) if tokenizer else None
    (train_set, _, _), layout = build_gpt_datasets(paths, weights, "100,0,0", 16, 7, [count, 0, 0], cache, VOCAB, tok)
    return layout, [(train_set[i]["tokens"], train_set[i]["modality_ids"]) for i in range(count)]


def test_megatron_prefix_trains_as_text_alone_and_blended(tmp_path):
    megatron, ours = write_megatron_prefix(tmp_path / "megatron"), project_prefix(tmp_path)
    layout, alone = run_distributed(samples, 1, None, paths=[megatron], weights=None, cache=str(tmp_path / "c1"))[0]
    assert (layout.tokenizer, layout.text_size, layout.eod, layout.modalities) == ("unrecorded", VOCAB, None, [])
    written = np.fromfile(f"{megatron}.bin", dtype=np.uint16)
    assert all(int(m.abs().sum()) == 0 and set(t.tolist()) <= set(written.tolist()) for t, m in alone)

    layout, blend = run_distributed(
        samples, 1, None, paths=[megatron, ours], weights=[1.0, 1.0], cache=str(tmp_path / "c2"), tokenizer="bytes"
    )[0]
    assert layout.tokenizer == "bytes-v1" and layout.eod == EOD
    ascii_ids = sum(int((t < 128).sum()) for t, _ in blend)  # the project's documents
    assert 0 < ascii_ids < sum(t.numel() for t, _ in blend) and all(int(m.abs().sum()) == 0 for _, m in blend)

    for name, paths in (("alone", [megatron]), ("blended", [megatron, ours])):
        records = run_distributed(train, 1, None, run_dir=str(tmp_path / name), cfg=config(paths))[0]
        assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records), name


def test_ids_outside_the_vocabulary_are_refused_before_training(tmp_path):
    from megatron_ext.data.gpt_dataset import shared_layout
    from megatron_ext.data.tokenizers import ByteTokenizer
    from megatron_ext.training.loop import Trainer

    megatron = write_megatron_prefix(tmp_path / "wide", vocab_size=70_000, extra_id=300)
    assert np.fromfile(f"{megatron}.bin", dtype=np.int32).max() == 300  # Megatron's dtype for a large vocabulary
    cfg = from_dict(RunConfig, config([megatron]))
    message = r"data.paths: .*wide.bin: holds token id 300, but model.vocab_size is 264: .* set model.vocab_size >= 301"
    with pytest.raises(ConfigError, match=message):
        check_run(cfg, 1, cuda=False)
    with pytest.raises(ConfigError, match=message):  # the trainer's first act, before any process group
        Trainer(cfg, tmp_path / "run", log=lambda line: None).run()
    assert not (tmp_path / "run").exists()

    narrow = write_megatron_prefix(tmp_path / "narrow", extra_id=260)  # fits the model, not the bytes tokenizer
    with pytest.raises(
        DataError,
        match=r"narrow.bin: holds token id 260, outside the vocabulary of "
        r"data.tokenizer \(bytes-v1\), 257 ids: .* not written with that tokenizer",
    ):
        shared_layout([narrow], [check_prefix(narrow, VOCAB)], ByteTokenizer(), VOCAB)


def test_the_id_scan_is_cached_beside_the_files_and_redone_when_they_change(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_SCAN_CHUNK", 7)  # many chunks: the reduction over them is what is checked
    prefix = write_megatron_prefix(tmp_path / "m")
    written = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    manifest = check_prefix(prefix, model_vocab_size=VOCAB)
    assert (manifest["vocab"], manifest["max_token_id"], manifest["tokens"]) == (None, 256, len(written))
    assert manifest["documents"] == 60
    cache = scan_cache_path(prefix)
    assert json.loads(cache.read_text())["min_id"] == int(written.min())

    # Read, not rescanned: a cache that says otherwise (with the files' sizes and times) is believed.
    forged = {**json.loads(cache.read_text()), "max_id": 5}
    cache.write_text(json.dumps(forged))
    assert check_prefix(prefix)["max_token_id"] == 5

    # Changed data: scanned again.
    stat = os.stat(f"{prefix}.bin")
    np.full_like(written, 7).tofile(f"{prefix}.bin")
    os.utime(f"{prefix}.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert check_prefix(prefix)["max_token_id"] == 7 and json.loads(cache.read_text())["max_id"] == 7


def test_incomplete_or_missing_prefixes_are_not_taken_for_megatron_data(tmp_path):
    ours = Path(project_prefix(tmp_path))
    Path(f"{ours}.manifest.json").unlink()  # a preprocessing run stopped before its last move
    with pytest.raises(DataError, match="manifest not found beside ours.modality.idx: .* is incomplete"):
        check_prefix(ours)
    write_megatron_prefix(tmp_path / "half")
    Path(tmp_path / "half.idx").unlink()
    with pytest.raises(DataError, match="manifest not found, nor a Megatron-LM half.bin / half.idx pair"):
        check_prefix(tmp_path / "half")
