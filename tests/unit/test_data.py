"""Preprocessing, indexed datasets, multimodal packing, blending, sample order and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.data.gpt_dataset import build_gpt_datasets
from megatron_ext.data.indexed import DataError, check_prefix, paths
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.synthetic import step_micro_batches
from megatron_ext.data.tokenizers import ByteTokenizer, train_bpe
from megatron_ext.data.vocab import MODALITIES, VocabLayout
from megatron_ext.run import RunConfig, check_run


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    """Megatron's dataset builders synchronize through torch.distributed: a one-rank gloo group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


TEXTS = ["hello world", "a second document, a bit longer than the first one", "third: ünïcödé too", "x" * 50]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def multimodal_records(n=40):
    rng = np.random.default_rng(0)
    for i in range(n):
        caption = {"modality": "text", "text": f"picture number {i}"}
        image = {"modality": "image", "tokens": rng.integers(0, 16, size=int(rng.integers(4, 30))).tolist()}
        audio = {"modality": "audio", "tokens": rng.integers(0, 8, size=5).tolist()}
        yield {"segments": [caption, image, audio] if i % 2 else [image, caption]}


def build(prefixes, weights=None, seq=16, seed=7, samples=200, vocab=1024, tmp=None):
    (train, valid, _), layout = build_gpt_datasets(
        prefixes, weights, "100,0,0", seq, seed, [samples, 0, 0], str(tmp), vocab
    )
    return train, layout


def test_text_round_trip_through_indexed_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in TEXTS])
    for spec in ("bytes", str(train_bpe(TEXTS * 20, 300, tmp_path / "tok.json").path)):
        prefix = tmp_path / f"out_{len(spec)}"
        summary = preprocess([src], prefix, spec, workers=2, progress=False)
        tok = ByteTokenizer() if spec == "bytes" else train_bpe.__globals__["BPETokenizer"](spec)
        dataset = IndexedDataset(str(prefix))
        assert summary.documents == len(TEXTS) == len(dataset)
        for i, text in enumerate(TEXTS):
            assert dataset[i].tolist() == tok.encode(text) + [tok.eod]
        manifest = check_prefix(prefix)
        assert manifest["vocab"]["tokenizer"] == tok.identity and manifest["tokens"] == summary.tokens


def test_multimodal_ids_stay_aligned_through_packing(tmp_path):
    src = write_jsonl(tmp_path / "mm.jsonl", multimodal_records())
    summary = preprocess([src], tmp_path / "mm", "bytes", codebooks={"image": 16, "audio": 8}, progress=False)
    assert summary.tokens_per_modality["image"] > 0 and summary.tokens_per_modality["audio"] > 0
    train, layout = build([str(tmp_path / "mm")], tmp=tmp_path / "cache")
    table = torch.from_numpy(layout.modality_of_ids().astype(np.int64))
    seen = set()
    for i in range(len(train)):
        sample = train[i]
        assert sample["modality_ids"].shape == sample["tokens"].shape
        # Disjoint id ranges: a token's id determines its modality, so this checks alignment.
        assert torch.equal(sample["modality_ids"], table[sample["tokens"]])
        assert torch.equal(sample["label_modality_ids"], table[sample["labels"]])
        seen |= set(sample["modality_ids"].tolist())
    assert seen == {MODALITIES.index(m) for m in ("text", "image", "audio")}


def test_blend_proportions_follow_weights(tmp_path):
    for name, char in (("a", "a"), ("b", "b")):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": char * 40} for _ in range(50)])
        preprocess([tmp_path / f"{name}.jsonl"], tmp_path / name, "bytes", progress=False)
    train, _ = build([str(tmp_path / "a"), str(tmp_path / "b")], [0.3, 0.7], samples=10_000, tmp=tmp_path / "c")
    from_a = sum(int((train[i]["tokens"] == ord("a")).any()) for i in range(10_000))
    assert abs(from_a / 10_000 - 0.3) <= 0.02, from_a


def test_same_seed_same_order_and_resume_continues(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i} " * (i % 7 + 1)} for i in range(200)])
    preprocess([src], tmp_path / "d", "bytes", progress=False)
    first, _ = build([str(tmp_path / "d")], tmp=tmp_path / "c1")
    again, _ = build([str(tmp_path / "d")], tmp=tmp_path / "c2")
    other, _ = build([str(tmp_path / "d")], seed=8, tmp=tmp_path / "c3")

    def tokens(ds, consumed, steps):
        out = []
        for step in range(steps):
            for batch in step_micro_batches(ds, consumed + step * 8, 8, 2, dp_rank=0, dp_size=2):
                out.append(batch["tokens"])
        return torch.cat(out)

    full = tokens(first, 0, 6)
    assert torch.equal(full, tokens(again, 0, 6))
    assert not torch.equal(full, tokens(other, 0, 6))
    assert torch.equal(tokens(first, 3 * 8, 3), full[len(full) // 2 :])  # resume at consumed = 24


def _small_prefix(tmp_path, name="p"):
    write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in TEXTS])
    preprocess([tmp_path / f"{name}.jsonl"], tmp_path / name, "bytes", progress=False)
    return paths(tmp_path / name)


def test_truncated_bin_is_reported(tmp_path):
    p = _small_prefix(tmp_path)
    p["bin"].write_bytes(p["bin"].read_bytes()[:-3])
    with pytest.raises(DataError, match=r"p\.bin: .* bytes, but p\.idx describes .* truncated"):
        check_prefix(tmp_path / "p")


def test_corrupt_or_truncated_idx_is_reported(tmp_path):
    p = _small_prefix(tmp_path)
    data = p["idx"].read_bytes()
    p["idx"].write_bytes(b"GARBAGE!!" + data[9:])
    with pytest.raises(DataError, match=r"p\.idx: not a Megatron index file"):
        check_prefix(tmp_path / "p")
    p["idx"].write_bytes(data[:-5])
    with pytest.raises(DataError, match=r"p\.idx: .* bytes, but its header describes"):
        check_prefix(tmp_path / "p")


def test_idx_dtype_disagreeing_with_bin_is_reported(tmp_path):
    p = _small_prefix(tmp_path)
    data = bytearray(p["idx"].read_bytes())
    data[17] = 4  # dtype code: int32 instead of uint16
    p["idx"].write_bytes(bytes(data))
    with pytest.raises(DataError, match="the .bin is truncated or the .idx dtype disagrees"):
        check_prefix(tmp_path / "p")


def test_tokenizer_and_vocabulary_mismatches_are_reported(tmp_path):
    _small_prefix(tmp_path)
    with pytest.raises(DataError, match="tokenized with 'bytes-v1', but this run uses 'bpe-"):
        check_prefix(tmp_path / "p", tokenizer_identity="bpe-300-0123")
    with pytest.raises(DataError, match="the data uses 257 ids .* but model.vocab_size is 200"):
        check_prefix(tmp_path / "p", model_vocab_size=200)
    cfg = from_dict(
        RunConfig, {"data": {"kind": "indexed", "paths": [str(tmp_path / "p")]}, "model": {"vocab_size": 200}}
    )
    with pytest.raises(ConfigError, match="data.paths: .*model.vocab_size is 200"):
        check_run(cfg, 1, cuda=False)


def test_missing_data_paths_are_reported(tmp_path):
    cfg = from_dict(RunConfig, {"data": {"kind": "indexed", "paths": [str(tmp_path / "nope")]}})
    with pytest.raises(ConfigError, match=r"data.paths: .*nope.manifest.json: manifest not found"):
        check_run(cfg, 1, cuda=False)


def test_empty_input_and_out_of_vocabulary_tokens_are_reported(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no documents found in .*empty.jsonl: the input is empty"):
        preprocess([tmp_path / "empty.jsonl"], tmp_path / "e", "bytes", progress=False)
    assert not paths(tmp_path / "e")["manifest"].exists()
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "ok"}, {"segments": [{"modality": "image", "tokens": [1, 99]}]}]
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: segment 0: image token 99 is outside the codebook \[0, 16\)"):
        preprocess([bad], tmp_path / "b", "bytes", codebooks={"image": 16}, progress=False)


def test_bad_blend_weights_are_config_errors():
    for weights, message in (
        ([-1.0, 2.0], "must not be negative"),
        ([0.0, 0.0], "must not sum to zero"),
        ([1.0], "weights has 1 entries for 2 paths"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_dict(RunConfig, {"data": {"kind": "indexed", "paths": ["a", "b"], "weights": weights}})


def test_vocab_layout_ranges_are_disjoint():
    layout = VocabLayout.build("bytes-v1", 257, 256, {"image": 16, "audio": 8})
    image, audio = layout.modality("image"), layout.modality("audio")
    assert (image.offset, image.begin, image.end) == (257, 273, 274)
    assert (audio.offset, audio.end) == (275, 284) and layout.size == 285
    table = layout.modality_of_ids()
    assert table[256] == 0 and table[257] == table[274] == 1 and table[275] == table[284] == 3


@pytest.mark.parametrize("stream", ["tokens", "modality"])
def test_ids_in_a_bin_beyond_its_manifest_are_reported_not_indexed(stream, tmp_path):
    src = write_jsonl(tmp_path / "mm.jsonl", multimodal_records())
    preprocess([src], tmp_path / "mm", "bytes", codebooks={"image": 16, "audio": 8}, progress=False)
    p = paths(tmp_path / "mm")
    target = p["bin"] if stream == "tokens" else p["modality_bin"]
    dtype = np.uint16 if stream == "tokens" else np.uint8
    data = np.fromfile(target, dtype=dtype)
    data[:] = 60000 if stream == "tokens" else 9  # same size, ids the manifest does not allow
    data.tofile(target)
    train, _ = build([str(tmp_path / "mm")], tmp=tmp_path / "cache")
    with pytest.raises(DataError, match=r"sample 0 holds (token|modality) id \d+, outside the \d+ its manifest allows"):
        train[0]
