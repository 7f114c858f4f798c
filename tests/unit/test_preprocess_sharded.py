"""Sharded preprocessing and the merge step; HF ``datasets`` inputs (parquet, saved datasets, globs).

A job split into N shards and merged must write exactly what one process writes (every file, byte
for byte, manifest included); parquet files and saved datasets must tokenize to what the same
documents give as JSONL; a missing column, an unreadable input and a merge of incompatible or
incomplete parts must be refused with a message that says what to do, before any output exists.
"""

import json
from pathlib import Path

import pytest

from megatron_ext.data.cli import preprocess_main
from megatron_ext.data.indexed import DataError, check_prefix, paths
from megatron_ext.data.merge import merge
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.sources import Shard

datasets = pytest.importorskip("datasets")

CODEBOOKS = {"image": 16}
TEXTS = [f"document {i}: " + "abc " * (i % 5) for i in range(9)]
IMAGE = {"segments": [{"modality": "text", "text": "a caption"}, {"modality": "image", "tokens": [0, 3, 15]}]}


@pytest.fixture
def inputs(tmp_path):
    """A JSONL file (with empty lines and a multimodal record), a parquet file and a saved
    dataset: a source of each kind, so that shard boundaries fall inside and between them."""
    src = tmp_path / "src"
    src.mkdir()
    jsonl = src / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [{"text": TEXTS[0]}, IMAGE, {"text": TEXTS[1]}]) + "\n\n")
    datasets.Dataset.from_dict({"text": TEXTS[2:6], "id": list(range(4))}).to_parquet(str(src / "b.parquet"))
    datasets.Dataset.from_dict({"text": TEXTS[6:]}).save_to_disk(str(src / "saved"))
    return [str(jsonl), str(src / "*.parquet"), str(src / "saved")]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def files_of(prefix):
    return {key: path.read_bytes() for key, path in paths(prefix).items()}


def sharded_equals_one_process(inputs, tmp_path, num_shards):
    preprocess(inputs, tmp_path / "one", "bytes", CODEBOOKS, progress=False)
    parts = []
    for index in range(num_shards):
        parts.append(str(tmp_path / f"part-{index}"))
        preprocess(inputs, parts[-1], "bytes", CODEBOOKS, progress=False, shard=Shard(index, num_shards))
    assert json.loads(paths(parts[1])["manifest"].read_text())["shard"] == {"index": 1, "count": num_shards}
    # Shards given out of order are put in shard order.
    assert preprocess_main(["merge", "--inputs", *reversed(parts), "--output-prefix", str(tmp_path / "merged")]) == 0
    merged, one = files_of(tmp_path / "merged"), files_of(tmp_path / "one")
    assert merged.keys() == one.keys()
    for key in one:
        assert merged[key] == one[key], key
    return check_prefix(tmp_path / "merged")


def test_sharded_preprocess_and_merge_equal_one_process_byte_for_byte(inputs, tmp_path):
    assert sharded_equals_one_process(inputs, tmp_path, 3)["documents"] == len(TEXTS) + 1


def test_more_shards_than_records_leaves_some_empty(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS[:2]])
    assert sharded_equals_one_process([str(src)], tmp_path, 4)["documents"] == 2
    assert json.loads(paths(tmp_path / "part-0")["manifest"].read_text())["documents"] == 0


def test_shard_ranges_are_contiguous_and_cover_every_record():
    ranges = [Shard(i, 4).records(10) for i in range(4)]
    assert ranges == [(0, 2), (2, 5), (5, 7), (7, 10)]
    with pytest.raises(ValueError, match="--shard-index 4: must be in"):
        Shard(4, 4)


def test_merge_refuses_incomplete_or_mixed_inputs(inputs, tmp_path):
    parts = [tmp_path / f"part-{i}" for i in range(3)]
    for i, part in enumerate(parts):
        preprocess(inputs, part, "bytes", CODEBOOKS, progress=False, shard=Shard(i, 3))
    with pytest.raises(DataError, match=r"shards \[1\] are missing"):
        merge([parts[0], parts[2]], tmp_path / "m")
    with pytest.raises(DataError, match=r"shards \[0\] are given twice"):
        merge([parts[0], parts[0], parts[2]], tmp_path / "m")
    preprocess(inputs, tmp_path / "other", "bytes", {"image": 32}, progress=False)
    with pytest.raises(DataError, match="not a shard, but other inputs are shards"):
        merge([*parts, tmp_path / "other"], tmp_path / "m")
    preprocess(inputs, tmp_path / "whole", "bytes", CODEBOOKS, progress=False)
    with pytest.raises(DataError, match="vocabulary layout .* differs"):
        merge([tmp_path / "whole", tmp_path / "other"], tmp_path / "m")
    assert not any(p.exists() for p in paths(tmp_path / "m").values())


def test_merge_refuses_another_tokenizer(tmp_path, capsys):
    from tests.tiny_tokenizers import corpus, hf_bpe_dir

    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in corpus(20)])
    preprocess([src], tmp_path / "bytes", "bytes", progress=False)
    preprocess([src], tmp_path / "bpe", str(hf_bpe_dir(tmp_path / "tok")), progress=False)
    argv = ["merge", "--inputs", str(tmp_path / "bytes"), str(tmp_path / "bpe"), "--output-prefix", str(tmp_path / "m")]
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenized with" in err and "preprocess every input with the same tokenizer" in err


def test_tables_tokenize_as_the_same_documents_in_jsonl(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    preprocess([tmp_path / "d.jsonl"], tmp_path / "from_jsonl", "bytes", progress=False)
    table = datasets.Dataset.from_dict({"body": TEXTS})
    table.select(range(4)).to_parquet(str(tmp_path / "t-0.parquet"))
    table.select(range(4, len(TEXTS))).to_parquet(str(tmp_path / "t-1.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for name, given in [("parquet", [str(tmp_path / "t-*.parquet")]), ("saved", [str(tmp_path / "saved")])]:
        argv = [
            "--input",
            *given,
            "--output-prefix",
            str(tmp_path / name),
            "--tokenizer",
            "bytes",
            "--text-key",
            "body",
        ]
        assert preprocess_main(argv) == 0
        for key in ("bin", "idx", "modality_bin", "modality_idx"):
            assert paths(tmp_path / name)[key].read_bytes() == paths(tmp_path / "from_jsonl")[key].read_bytes()


def _refused(argv, capsys, phrase):
    assert preprocess_main([*argv, "--tokenizer", "bytes"]) == 2
    err = capsys.readouterr().err
    assert phrase in err, err


def test_unusable_tables_are_refused_before_any_work(tmp_path, capsys):
    out = ["--output-prefix", str(tmp_path / "out")]
    datasets.Dataset.from_dict({"content": ["a"], "n": [1]}).to_parquet(str(tmp_path / "a.parquet"))
    _refused(["--input", str(tmp_path / "a.parquet"), *out], capsys, "no column 'text' (its columns: content, n)")
    _refused(
        ["--input", str(tmp_path / "a.parquet"), "--text-key", "n", *out], capsys, "column 'n' holds Value('int64')"
    )
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    _refused(["--input", str(tmp_path / "bad.parquet"), *out], capsys, "cannot be read as a parquet file")
    _refused(["--input", str(tmp_path / "none-*.parquet"), *out], capsys, "no file matches this pattern")
    (tmp_path / "plain_dir").mkdir()
    _refused(["--input", str(tmp_path / "plain_dir"), *out], capsys, "not one written by Dataset.save_to_disk")
    table = datasets.Dataset.from_dict({"text": ["a"]})
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "splits"))
    _refused(["--input", str(tmp_path / "splits"), *out], capsys, "with the splits train, test; pass the split")
    with pytest.raises(SystemExit, match="2"):
        preprocess_main(["--input", "x.jsonl", *out, "--tokenizer", "bytes", "--num-shards", "2", "--shard-index", "2"])
    assert "--shard-index 2: must be in [0, 2)" in capsys.readouterr().err
    assert not any(p.exists() for p in paths(tmp_path / "out").values())


def test_bad_row_is_reported_with_its_file_and_row(tmp_path, capsys):
    datasets.Dataset.from_dict({"text": ["fine", None, "fine"]}).to_parquet(str(tmp_path / "a.parquet"))
    _refused(
        ["--input", str(tmp_path / "a.parquet"), "--output-prefix", str(tmp_path / "o")],
        capsys,
        "a.parquet (row 1): 'text' is null, not a string; fix or remove that record and run again",
    )


def test_progress_reports_throughput(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    preprocess([src], Path(tmp_path / "p"), "bytes", progress=True)
    assert "documents/s" in capsys.readouterr().err
