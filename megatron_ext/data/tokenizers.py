"""Text tokenizers: a byte-level BPE trained locally (``tokenizers`` library) and plain bytes.

Both expose ``encode(text) -> list[int]``, ``vocab_size``, ``eod`` and ``identity`` (kind plus a
hash of the vocabulary), which is stored with preprocessed data and checked at training time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, List

EOD_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes 0..255, then EOD = 256. Needs no training and no files."""

    vocab_size = 257
    eod = 256
    identity = "bytes-v1"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE (``tokenizers.Tokenizer``) saved as one JSON file."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist: train one with "
                                    "python -m data.train_tokenizer")
        self.path = path
        self._tok = Tokenizer.from_file(str(path))
        eod = self._tok.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"tokenizer {str(path)!r} has no {EOD_TOKEN} token")
        self.eod = eod
        self.vocab_size = self._tok.get_vocab_size()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.identity = f"bpe-{self.vocab_size}-{digest}"

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def train_bpe(texts: Iterable[str], vocab_size: int, output: str | Path) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` and save it to ``output`` (JSON)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: use >= 258")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(output))
    return BPETokenizer(output)


def load_tokenizer(spec: str):
    """``"bytes"`` or the path of a BPE JSON file."""
    return ByteTokenizer() if spec == "bytes" else BPETokenizer(spec)
