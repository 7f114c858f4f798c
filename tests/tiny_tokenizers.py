"""Tiny tokenizers built locally (no model hub), in the forms ``--tokenizer DIR`` takes: a byte-level
BPE saved by ``transformers`` (``save_pretrained``), and a SentencePiece model laid out as a
Llama-2 style repository (``tokenizer.model`` + ``tokenizer_config.json``), which
``transformers.AutoTokenizer`` converts on load. A few hundred lines of text train either in well
under a second."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import List, Optional

WORDS = (
    "the a model trains on tokens of text and code with def return class import while for in if else "
    "print value data loss step layer attention head window expert router batch"
).split()


def corpus(n: int = 300) -> List[str]:
    """``n`` deterministic short documents over a small vocabulary."""
    return [" ".join(WORDS[(7 * i + 3 * k) % len(WORDS)] for k in range(5 + i % 9)) + f" {i}." for i in range(n)]


def hf_bpe_dir(path: Path, eos_token: Optional[str] = "<|end_of_text|>", vocab_size: int = 300) -> Path:
    """A byte-level BPE (the ``tokenizers`` library) wrapped by ``PreTrainedTokenizerFast`` with
    ``eos_token`` (None: a tokenizer that declares no eos token) and saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **({"eos_token": eos_token} if eos_token else {}))
    wrapped.save_pretrained(str(path))
    return Path(path)


def sentencepiece_dir(path: Path, vocab_size: int = 120) -> Path:
    """A SentencePiece BPE (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) as ``path/tokenizer.model`` with the
    ``tokenizer_config.json`` of a Llama-2 style repository (class ``LlamaTokenizer``, eos ``</s>``)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path
