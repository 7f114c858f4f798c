"""Bad input records are refused by ``python -m data.preprocess`` with one clear message.

A record that is valid JSON but the wrong shape, a codebook id that is not an integer inside its
codebook, an unknown modality or a line that is not UTF-8 must stop preprocessing with exit status
2 and a message naming the file, the line and the problem (never a traceback), and must leave no
partial output behind and no previous output damaged, with or without worker processes.
"""

import json
from pathlib import Path

import pytest

from megatron_ext.data.cli import preprocess_main
from megatron_ext.data.indexed import DataError, check_prefix, paths
from megatron_ext.data.preprocess import preprocess

GOOD_LINES = [
    json.dumps({"text": "a first, plain text document"}),
    json.dumps({"segments": [{"modality": "text", "text": "a caption"}, {"modality": "image", "tokens": [0, 3, 15]}]}),
]


def image(tokens):
    return {"segments": [{"modality": "text", "text": "a caption"}, {"modality": "image", "tokens": tokens}]}


# (id, line 3 of the input, a phrase of the expected message)
BAD_RECORDS = [
    ("number", b"5", "the record is a number, but each line must be a JSON object"),
    ("string", b'"just a string"', "the record is a string, but each line must be a JSON object"),
    ("list", b'[{"text": "a"}]', "the record is a list, but each line must be a JSON object"),
    ("null", b"null", "the record is null, but each line must be a JSON object"),
    ("text not a string", json.dumps({"text": 42}).encode(), "'text' is a number, not a string"),
    (
        "segments not a list",
        json.dumps({"segments": {"modality": "text", "text": "a"}}).encode(),
        "'segments' is an object, not a list of segments",
    ),
    ("segment not an object", json.dumps({"segments": ["a caption"]}).encode(), "segment 0 is a string, not an object"),
    (
        "segment text not a string",
        json.dumps({"segments": [{"modality": "text", "text": ["a"]}]}).encode(),
        "segment 0: 'text' is a list, not a string",
    ),
    (
        "modality not a string",
        json.dumps({"segments": [{"modality": 1, "tokens": [1]}]}).encode(),
        "segment 0: 'modality' is a number, not a string",
    ),
    (
        "image tokens as a string",
        json.dumps({"segments": [{"modality": "image", "tokens": "1 2 3"}]}).encode(),
        "segment 0: image 'tokens' is a string, not a list of integer codebook ids",
    ),
    (
        "float id 3.0",
        json.dumps(image([1, 3.0])).encode(),
        "segment 1: image token 3.0 (item 1 of 'tokens') is not an integer",
    ),
    (
        "float id 3.5",
        json.dumps(image([3.5])).encode(),
        "segment 1: image token 3.5 (item 0 of 'tokens') is not an integer",
    ),
    (
        "boolean id",
        json.dumps(image([1, True])).encode(),
        "segment 1: image token true (item 1 of 'tokens') is not an integer",
    ),
    (
        "huge id",
        json.dumps(image([1, 10**30])).encode(),
        f"segment 1: image token {10**30} is outside the codebook [0, 16)",
    ),
    (
        "id just past the codebook",
        json.dumps(image([16])).encode(),
        "segment 1: image token 16 is outside the codebook [0, 16)",
    ),
    ("negative id", json.dumps(image([-1])).encode(), "segment 1: image token -1 is outside the codebook [0, 16)"),
    (
        "unknown modality",
        json.dumps({"segments": [{"modality": "smell", "tokens": [1]}]}).encode(),
        "segment 0: unknown modality 'smell' (known: text, image, video, audio)",
    ),
    (
        "modality without a codebook",
        json.dumps({"segments": [{"modality": "audio", "tokens": [1]}]}).encode(),
        "segment 0: modality 'audio' has no codebook in this run",
    ),
    ("not UTF-8", b'{"text": "caf\xe9"}', "not valid UTF-8 (byte 0xe9 at character 14 of the line)"),
]
# Cases also run with two worker processes: one refused while reading, one while encoding, one
# while decoding; the message must be the same as without workers.
WITH_WORKERS = {"list", "float id 3.0", "huge id", "not UTF-8"}


def write_input(tmp_path: Path, bad_line: bytes, name="docs.jsonl") -> Path:
    """An input whose first two records are good and whose third (line 3) is ``bad_line``."""
    src = tmp_path / name
    src.write_bytes(
        b"".join(line.encode() + b"\n" for line in GOOD_LINES) + bad_line + b"\n" + GOOD_LINES[0].encode() + b"\n"
    )
    return src


def run_cli(src: Path, prefix: Path, workers=1) -> int:
    return preprocess_main(
        [
            "--input",
            str(src),
            "--output-prefix",
            str(prefix),
            "--tokenizer",
            "bytes",
            "--codebook",
            "image=16",
            "--workers",
            str(workers),
        ]
    )


CASES = [pytest.param(*c, 1, id=c[0]) for c in BAD_RECORDS] + [
    pytest.param(*c, 2, id=f"{c[0]}, 2 workers") for c in BAD_RECORDS if c[0] in WITH_WORKERS
]


@pytest.mark.parametrize("case, bad_line, phrase, workers", CASES)
def test_bad_record_is_refused_and_leaves_no_output(tmp_path, capsys, case, bad_line, phrase, workers):
    src = write_input(tmp_path, bad_line)
    out_dir = tmp_path / "out"
    assert run_cli(src, out_dir / "corpus", workers) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert f"{src}:3: " in err and "line 3" in err and phrase in err, err
    assert sorted(p.name for p in out_dir.iterdir()) == [], "partial output left behind"


def test_non_utf8_line_of_a_text_file_is_refused(tmp_path):
    src = tmp_path / "docs.txt"
    src.write_bytes(b"first line\nsecond line\nthird \xff line\nfourth\n")
    with pytest.raises(DataError) as info:
        preprocess([src], tmp_path / "out" / "corpus", "bytes", progress=False)
    message = str(info.value)
    assert f"{src}:3: " in message and "line 3" in message and "not valid UTF-8 (byte 0xff" in message
    assert list((tmp_path / "out").iterdir()) == []


def test_first_bad_record_is_reported_with_workers(tmp_path, capsys):
    """Line 3 fails while encoding (in a worker), line 4 while reading: line 3 is reported, as
    without workers, although the reader meets line 4's problem first."""
    src = write_input(tmp_path, json.dumps(image([99])).encode())
    src.write_bytes(src.read_bytes() + b"[1, 2]\n")
    for workers in (1, 2):
        assert run_cli(src, tmp_path / "out" / "corpus", workers) == 2
        err = capsys.readouterr().err
        assert f"{src}:3: segment 1: image token 99 is outside the codebook [0, 16)" in err, err
        assert list((tmp_path / "out").iterdir()) == []


def test_failed_run_keeps_the_previous_output_intact(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(line + "\n" for line in GOOD_LINES))
    prefix = tmp_path / "out" / "corpus"
    assert run_cli(good, prefix) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert run_cli(write_input(tmp_path, b"5"), prefix) == 2
    assert "line 3" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    check_prefix(prefix)


def test_good_file_still_preprocesses(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(line + "\n" for line in GOOD_LINES + [""]))
    prefix = tmp_path / "out" / "corpus"
    assert run_cli(src, prefix) == 0
    assert "2 documents (0 empty skipped)" in capsys.readouterr().out
    manifest = check_prefix(prefix)
    assert manifest["documents"] == 2 and manifest["tokens_per_modality"]["image"] == 3 + 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths(prefix).values())


def test_empty_segment_list_is_an_empty_document(tmp_path, capsys):
    """``{"segments": []}`` has nothing to encode: it is skipped like any empty document."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(line + "\n" for line in GOOD_LINES + [json.dumps({"segments": []})]))
    assert run_cli(src, tmp_path / "out" / "corpus") == 0
    assert "2 documents (1 empty skipped)" in capsys.readouterr().out
