"""Batched preprocessing writes what the one-document-at-a-time reference writes, byte for byte.

Preprocessing tokenizes ``BATCH_DOCUMENTS`` documents per tokenizer call (``encode_batch``; for a
plain fast HF tokenizer, its ``tokenizers`` backend without offsets). The reference is ``encode``
of one text at a time (transformers' ``__call__`` for a HF directory) and Megatron-Core's builder
fed one document at a time with int64 ids, as preprocessing wrote its output before batching.
"""

import json
import pickle

import numpy as np
import pytest

from megatron_ext.data import preprocess as pp
from megatron_ext.data.indexed import paths, token_dtype
from megatron_ext.data.tokenizers import load_tokenizer, train_bpe
from megatron_ext.data.vocab import MODALITIES, VocabLayout
from tests.tiny_tokenizers import corpus, hf_bpe_dir, sentencepiece_dir

CODEBOOKS = {"image": 16}
TRICKY = [
    "",
    " leading space and trailing  ",
    "special tokens as text: <|end_of_text|> </s> <|endoftext|> <s>",
    "ünïcödé, 漢字 and 🙂\n\ttabs\r\nand line ends",
]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "bytes": "bytes",
        "json": str(train_bpe(corpus(), 300, root / "bpe.json").path),
        "hf": str(hf_bpe_dir(root / "bpe")),
        "sentencepiece": str(sentencepiece_dir(root / "sp")),
    }


def records():
    """Text documents, multimodal ones, empty ones and texts that look like special tokens."""
    out = []
    for i, text in enumerate(corpus(150)):
        if i % 7 == 0:
            image = {"modality": "image", "tokens": [i % 16, 3, 5]}
            out.append({"segments": [{"modality": "text", "text": text}, image, {"modality": "text", "text": "end"}]})
        elif i % 11 == 0:
            out.append({"text": ""})
        elif i % 13 == 0:
            out.append({"segments": [{"modality": "image", "tokens": [1, 2]}, {"modality": "text", "text": ""}]})
        else:
            out.append({"text": text + (TRICKY[i % len(TRICKY)] if i % 5 == 0 else "")})
    return out


@pytest.mark.parametrize("kind", ["bytes", "json", "hf", "sentencepiece"])
def test_encode_batch_gives_the_ids_of_encode(kind, specs):
    tok = load_tokenizer(specs[kind])
    texts = corpus(30) + TRICKY
    expected = [tok.encode(text) for text in texts]
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch([]) == []
    sent = pickle.loads(pickle.dumps(tok.encoder()))  # what a worker process receives
    assert sent.encode_batch(texts) == expected and [sent.encode(text) for text in texts] == expected


def _start_encoding(spec):
    tok = load_tokenizer(spec)
    layout = VocabLayout.build(tok.identity, tok.vocab_size, tok.eod, CODEBOOKS)
    pp._init_worker(tok, spec, None, layout, "text")
    return layout


@pytest.mark.parametrize("kind", ["bytes", "hf"])
def test_batched_encoding_equals_the_per_document_reference(kind, specs):
    _start_encoding(specs[kind])
    items = [("docs.jsonl", n, record) for n, record in enumerate(records(), 1)]
    # a record whose modality has no codebook (an error mid-batch) and a read error at the end
    items.insert(5, ("docs.jsonl", 0, {"segments": [{"modality": "audio", "tokens": [1]}]}))
    items.append("docs.jsonl:999: not valid JSON")
    batched = pp._encode_batch(items)
    reference = [pp._encode(item) for item in items]
    assert len(batched) == len(reference)
    for got, want in zip(batched, reference):
        if want is None or isinstance(want, str):
            assert got == want
        else:
            assert got[0].dtype == want[0].dtype and got[1].dtype == np.uint8
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert isinstance(batched[5], str) and "has no codebook" in batched[5]


def _reference_output(spec, prefix, docs):
    """What preprocessing wrote before batching: each document encoded on its own (``encode``) and
    added to Megatron-Core's builders as int64 ids, one document at a time."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    layout = _start_encoding(spec)
    out = paths(prefix)
    tokens = IndexedDatasetBuilder(str(out["bin"]), dtype=token_dtype(layout.size))
    modalities = IndexedDatasetBuilder(str(out["modality_bin"]), dtype=np.uint8)
    for n, record in enumerate(docs, 1):
        result = pp._encode(("docs.jsonl", n, record))
        if result is not None:
            ids, mods = result
            tokens.add_document(ids.astype(np.int64), [len(ids)])
            modalities.add_document(mods, [len(mods)])
    tokens.finalize(str(out["idx"]))
    modalities.finalize(str(out["modality_idx"]))
    return out


@pytest.mark.parametrize("kind, workers", [("hf", 1), ("hf", 2), ("json", 1), ("bytes", 1)])
def test_preprocess_writes_the_reference_output_byte_for_byte(kind, workers, specs, tmp_path):
    docs = records() * 3  # several batches of BATCH_DOCUMENTS, the last one partial
    assert len(docs) > 2 * pp.BATCH_DOCUMENTS and len(docs) % pp.BATCH_DOCUMENTS
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(record) + "\n" for record in docs))
    summary = pp.preprocess([src], tmp_path / "out", specs[kind], CODEBOOKS, workers=workers, progress=False)
    want = _reference_output(specs[kind], tmp_path / "ref", docs)
    got = paths(tmp_path / "out")
    for key in ("bin", "idx", "modality_bin", "modality_idx"):
        assert got[key].read_bytes() == want[key].read_bytes(), key
    mods = np.fromfile(want["modality_bin"], dtype=np.uint8)
    assert (
        summary.tokens == len(mods)
        and summary.tokens_per_modality["image"] == int((mods == MODALITIES.index("image")).sum()) > 0
    )
    manifest = json.loads(got["manifest"].read_text())
    assert manifest["tokens_per_modality"] == summary.tokens_per_modality
    assert manifest["max_token_id"] == int(np.fromfile(want["bin"], dtype=np.dtype(manifest["dtype"])).max())
