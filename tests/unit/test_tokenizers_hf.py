"""HF tokenizer directories (BPE through ``save_pretrained``, SentencePiece through ``tokenizer.model``)
as ``--tokenizer`` / ``data.tokenizer``: encoding, the end-of-document id, an identity that survives
re-saving, preprocessing that records it, and clear errors before any work for a directory that is
not a tokenizer, a tokenizer with no eos token and an end-of-document token it does not have."""

import json
import re

import numpy as np
import pytest

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.data.cli import preprocess_main
from megatron_ext.data.indexed import DataError, check_prefix, paths
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.tokenizers import HFTokenizer, load_tokenizer
from megatron_ext.run import RunConfig
from tests.tiny_tokenizers import corpus, hf_bpe_dir, sentencepiece_dir


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "bpe": hf_bpe_dir(root / "bpe"),
        "sentencepiece": sentencepiece_dir(root / "sp"),
        "no_eos": hf_bpe_dir(root / "no_eos", eos_token=None),
    }


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus(40)))
    return path


@pytest.mark.parametrize("kind, eos", [("bpe", "<|end_of_text|>"), ("sentencepiece", "</s>")])
def test_directory_encodes_without_special_tokens_and_ends_documents_with_its_eos(kind, eos, tokenizer_dirs):
    from transformers import AutoTokenizer

    tok = load_tokenizer(str(tokenizer_dirs[kind]))
    reference = AutoTokenizer.from_pretrained(str(tokenizer_dirs[kind]))
    assert isinstance(tok, HFTokenizer) and tok.identity.startswith(f"hf-{tok.vocab_size}-")
    assert tok.eod == reference.convert_tokens_to_ids(eos)
    for text in corpus(5):
        ids = tok.encode(text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"]  # no BOS: a document is its text
        assert tok.eod not in ids and max(ids) < tok.vocab_size and tok.decode(ids) == text


def test_identity_follows_the_content_not_the_files(tokenizer_dirs, tmp_path):
    from transformers import AutoTokenizer

    sp = load_tokenizer(str(tokenizer_dirs["sentencepiece"]))
    AutoTokenizer.from_pretrained(str(tokenizer_dirs["sentencepiece"])).save_pretrained(str(tmp_path / "resaved"))
    assert not (tmp_path / "resaved" / "tokenizer.model").exists()  # converted: a tokenizer.json now
    assert load_tokenizer(str(tmp_path / "resaved")).identity == sp.identity
    assert load_tokenizer(str(tokenizer_dirs["bpe"])).identity != sp.identity


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_preprocessing_records_the_directory_and_training_checks_it(kind, tokenizer_dirs, documents, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    spec = str(tokenizer_dirs[kind])
    tok = load_tokenizer(spec)
    summary = preprocess([documents], tmp_path / "p", spec, progress=False)
    data = IndexedDataset(str(tmp_path / "p"))
    assert summary.documents == len(data) == 40
    for i, text in enumerate(corpus(40)):
        assert data[i].tolist() == tok.encode(text) + [tok.eod]
    manifest = check_prefix(tmp_path / "p", model_vocab_size=tok.vocab_size, tokenizer_identity=tok.identity)
    assert manifest["vocab"]["tokenizer"] == tok.identity and manifest["vocab"]["eod"] == tok.eod
    assert np.dtype(manifest["dtype"]) == np.uint16
    with pytest.raises(DataError, match=f"tokenized with '{tok.identity}', but this run uses 'bytes-v1'"):
        check_prefix(tmp_path / "p", tokenizer_identity="bytes-v1")


def _cli(documents, prefix, tokenizer, *extra):
    return preprocess_main(
        ["--input", str(documents), "--output-prefix", str(prefix), "--tokenizer", str(tokenizer), *extra]
    )


def test_eod_token_names_the_end_of_document_of_a_tokenizer_without_eos(tokenizer_dirs, documents, tmp_path, capsys):
    spec = str(tokenizer_dirs["no_eos"])
    assert _cli(documents, tmp_path / "p", spec, "--eod-token", "<|end_of_text|>") == 0
    tok = load_tokenizer(spec, "<|end_of_text|>")
    manifest = check_prefix(tmp_path / "p")
    assert manifest["vocab"]["eod"] == tok.eod == tok.encode("<|end_of_text|>")[0]
    assert manifest["documents"] == 40 and "40 documents" in capsys.readouterr().out


def test_bad_tokenizers_are_refused_before_any_work(tokenizer_dirs, documents, tmp_path, capsys):
    not_a_tokenizer = tmp_path / "model"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "config.json").write_text("{}")
    cases = [
        ((not_a_tokenizer,), "is not a tokenizer directory: it holds none of tokenizer.json, "),
        ((tokenizer_dirs["no_eos"],), "has no end-of-document token .* pass --eod-token TOKEN"),
        (
            (tokenizer_dirs["sentencepiece"], "--eod-token", "<|endoftext|>"),
            r"'<\|endoftext\|>' .* is not in the vocabulary of .*its special tokens: '<s>', '</s>', '<unk>'",
        ),
        (("bytes", "--eod-token", "</s>"), "does not apply to the 'bytes' tokenizer"),
    ]
    for args, message in cases:
        assert _cli(documents, tmp_path / "out" / "p", *args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert re.search(message, err), err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not paths(tmp_path / "out" / "p")["manifest"].exists()


def test_eod_token_in_a_run_config_needs_a_tokenizer_file_or_directory():
    for data, message in (
        ({"eod_token": "</s>"}, r"data.eod_token='</s>' names a token of tokenizer, which is None"),
        ({"tokenizer": "bytes", "eod_token": "</s>"}, "which is 'bytes'"),
    ):
        with pytest.raises(ConfigError, match=message):
            from_dict(RunConfig, {"data": data})
    assert from_dict(RunConfig, {"data": {"tokenizer": "tok", "eod_token": "</s>"}}).data.eod_token == "</s>"
