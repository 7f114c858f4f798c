"""Text tokenizers: plain bytes, a ``tokenizers`` JSON file, or a HF tokenizer directory.

    bytes                 UTF-8 bytes 0..255 and EOD = 256; no files
    FILE.json             a ``tokenizers.Tokenizer`` (``python -m data.train_tokenizer`` writes one)
    DIR                   a HF tokenizer directory (``save_pretrained`` output, or a model repository's
                          tokenizer files), loaded with ``transformers.AutoTokenizer``: BPE
                          (``tokenizer.json``), SentencePiece (``tokenizer.model``) and tiktoken-based
                          tokenizers alike

Every kind exposes ``encode(text) -> list[int]``, ``encode_batch(texts) -> list[list[int]]`` (the
same ids as ``encode`` of each text, in one call: what preprocessing uses), ``encoder()`` (the
encoding half alone, cheap to send to worker processes; None where a worker must load the
tokenizer itself), ``decode(ids)``, ``vocab_size`` (ids are in ``[0, vocab_size)``), ``eod`` and
``identity``. ``eod`` is the id appended to every document: the tokenizer's own end-of-text token
(``<|endoftext|>`` in a JSON file; the eos token of a directory, e.g. ``<|end_of_text|>`` or
``</s>``) unless ``eod_token`` names another; None when it has none, which only preprocessing
refuses (:func:`require_eod`): reading data or generating needs no EOD. ``identity`` (kind,
vocabulary size and a hash of the tokenizer's content) is stored in the data's manifest and checked
against the run's ``data.tokenizer`` at training time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, List, Optional, Union

EOD_TOKEN = "<|endoftext|>"
"""The end-of-document token of a tokenizer JSON file (the one :func:`train_bpe` adds)."""

TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files of which a HF tokenizer directory holds at least one (or a ``*.tiktoken`` file)."""

SPEC_FORMS = "'bytes', a tokenizer .json file (python -m data.train_tokenizer writes one) or a HF tokenizer directory"


class ByteTokenizer:
    """UTF-8 bytes 0..255, then EOD = 256. Needs no training and no files."""

    vocab_size = 257
    eod = 256
    identity = "bytes-v1"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def encoder(self) -> "ByteTokenizer":
        return self

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` saved as one JSON file (a byte-level BPE from :func:`train_bpe`, or
    any ``tokenizer.json``). Its identity hashes the file, as recorded by earlier preprocessing."""

    def __init__(self, path: Union[str, Path], eod_token: Optional[str] = None):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist: give {SPEC_FORMS}")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises bare Exceptions on bad files
            raise ValueError(
                f"tokenizer file {str(path)!r} is not a tokenizers JSON file ({err}): give a tokenizer.json "
                "written by the tokenizers library (python -m data.train_tokenizer writes one); for a "
                "SentencePiece or tiktoken model give the directory that holds it with its "
                "tokenizer_config.json"
            ) from None
        if not self._tok.get_vocab(with_added_tokens=False):
            raise ValueError(_no_vocabulary(path, self._tok.get_vocab()))
        self.path = path
        self.vocab_size = self._tok.get_vocab_size()
        token = eod_token or EOD_TOKEN
        self.eod = self._tok.token_to_id(token)
        if self.eod is None and eod_token is not None:
            special = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
            raise ValueError(_not_in_vocabulary(eod_token, path, special))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.identity = f"bpe-{self.vocab_size}-{digest}"
        self._encoder = BackendEncoder(self._tok, add_special_tokens=True)  # as encode() adds them

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return self._encoder.encode_batch(texts)

    def encoder(self) -> "BackendEncoder":
        return self._encoder

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


class HFTokenizer:
    """A HF tokenizer directory through ``transformers.AutoTokenizer`` (local files only).

    Documents are encoded without the tokenizer's own special tokens (no BOS), so that every kind
    writes the same stream: a document's ids, then EOD. The identity hashes the tokenizer's
    serialized content (``tokenizers``' JSON for a fast tokenizer, else its vocabulary and special
    tokens), not its files: a directory re-saved with ``save_pretrained``, or a SentencePiece model
    converted on load, keeps the identity of the tokenizer it holds.
    """

    def __init__(self, path: Union[str, Path], eod_token: Optional[str] = None):
        path = Path(path)
        if not is_tokenizer_dir(path):
            raise ValueError(
                f"{str(path)!r} is not a tokenizer directory: it holds none of "
                f"{', '.join(TOKENIZER_FILE_NAMES)} or a *.tiktoken file; give {SPEC_FORMS} (a "
                "directory written by save_pretrained, or a model repository's tokenizer files)"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError(
                f"{str(path)!r} is a HF tokenizer directory, which is loaded with transformers: "
                "pip install 'megatron-ext[hf]'"
            ) from None
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:  # each tokenizer class fails in its own way; say which directory
            raise ValueError(
                f"transformers.AutoTokenizer could not load the tokenizer directory {str(path)!r} "
                f"({type(err).__name__}: {err}); check that it was written by save_pretrained "
                "and that the packages its tokenizer needs (sentencepiece, tiktoken) are "
                "installed"
            ) from None
        self.path = path
        vocab = self._tok.get_vocab()
        if not set(vocab) - set(self._tok.all_special_tokens):
            raise ValueError(_no_vocabulary(path, vocab))
        self.vocab_size = max(len(self._tok), max(vocab.values()) + 1)
        if eod_token is not None:
            if eod_token not in vocab:
                raise ValueError(_not_in_vocabulary(eod_token, path, self._tok.all_special_tokens))
            self.eod = vocab[eod_token]
        else:
            self.eod = self._tok.eos_token_id
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            content = backend.to_str()
        else:
            special = {name: str(value) for name, value in self._tok.special_tokens_map.items()}
            content = json.dumps([type(self._tok).__name__, sorted(vocab.items()), special])
        digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]
        self.identity = f"hf-{self.vocab_size}-{digest}"
        backend = _plain_backend(self._tok)
        if backend is not None:
            backend.encode_special_tokens = self._tok.split_special_tokens  # as transformers sets it per call
        self._encoder = BackendEncoder(backend, add_special_tokens=False) if backend is not None else None

    def encode(self, text: str) -> List[int]:
        # verbose=False: documents longer than the tokenizer's model_max_length are expected here.
        return self._tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """``encode`` of each text, in one call. A fast tokenizer whose class adds nothing to
        transformers' encoding path is encoded by its ``tokenizers`` backend directly, as that path
        would (``encode_batch``, no special tokens), without the offsets it computes; any other goes
        through transformers."""
        if self._encoder is not None:
            return self._encoder.encode_batch(texts)
        return self._tok(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []

    def encoder(self) -> Optional["BackendEncoder"]:
        """The backend alone where it encodes as transformers does (see :meth:`encode_batch`);
        None otherwise, and a worker then loads the directory with transformers."""
        return self._encoder

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


TextTokenizer = Union[ByteTokenizer, BPETokenizer, HFTokenizer]


class BackendEncoder:
    """The encoding half of a ``tokenizers.Tokenizer``: ``encode`` and ``encode_batch`` with fixed
    ``add_special_tokens``. It pickles as the tokenizer's JSON, so that a preprocessing worker
    rebuilds exactly the tokenizer the main process loaded without importing transformers (seconds
    per worker) or reading its files again."""

    def __init__(self, backend, add_special_tokens: bool):
        self._backend = backend
        self.add_special_tokens = add_special_tokens

    def __getstate__(self) -> dict:
        return {
            "json": self._backend.to_str(),
            "encode_special_tokens": self._backend.encode_special_tokens,
            "add_special_tokens": self.add_special_tokens,
        }

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(state["json"])
        self._backend.encode_special_tokens = state["encode_special_tokens"]
        self.add_special_tokens = state["add_special_tokens"]

    def encode(self, text: str) -> List[int]:
        return self._backend.encode(text, add_special_tokens=self.add_special_tokens).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        # encode_batch_fast (tokenizers >= 0.21): the ids of encode_batch without the character
        # offsets that it computes and nobody here reads.
        batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [e.ids for e in batch(texts, add_special_tokens=self.add_special_tokens)]


def _plain_backend(tok):
    """The ``tokenizers`` backend of a transformers fast tokenizer that encodes text exactly as its
    backend does (transformers' own ``__call__`` and ``_encode_plus``, no truncation or padding
    configured), else None. A class that overrides either step (e.g. to rewrite the text first) is
    left to transformers."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: always go through transformers
        return None
    cls = type(tok)
    backend = getattr(tok, "backend_tokenizer", None)
    plain = (
        isinstance(tok, TokenizersBackend)
        and cls.__call__ is PreTrainedTokenizerBase.__call__
        and cls._encode_plus is TokenizersBackend._encode_plus
        and not hasattr(tok, "_switch_to_input_mode")
        and backend is not None
        and backend.truncation is None
        and backend.padding is None
    )
    return backend if plain else None


def _no_vocabulary(path: Path, special_tokens: Iterable[str]) -> str:
    """Why a tokenizer that loads but holds nothing besides its special tokens is refused: it would
    encode every text to no ids at all (a tokenizer_config.json without the model file it names, an
    untrained tokenizer saved empty)."""
    known = ", ".join(repr(t) for t in special_tokens) or "none"
    return (
        f"tokenizer {str(path)!r} holds no vocabulary besides its special tokens ({known}): it would encode "
        "every text to nothing; give the tokenizer the data was (or will be) preprocessed with (a directory "
        "needs its model file, e.g. tokenizer.json or tokenizer.model, beside tokenizer_config.json)"
    )


def _not_in_vocabulary(token: str, path: Path, special_tokens: Iterable[str]) -> str:
    known = ", ".join(repr(t) for t in special_tokens) or "none"
    return (
        f"the end-of-document token {token!r} (--eod-token / data.eod_token) is not in the vocabulary of "
        f"{str(path)!r}: give one of its tokens (its special tokens: {known})"
    )


def is_tokenizer_dir(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a directory holding HF tokenizer files (see :data:`TOKENIZER_FILE_NAMES`)."""
    path = Path(path)
    return path.is_dir() and (
        any((path / name).is_file() for name in TOKENIZER_FILE_NAMES) or any(path.glob("*.tiktoken"))
    )


def load_tokenizer(spec: str, eod_token: Optional[str] = None) -> TextTokenizer:
    """``"bytes"``, a tokenizer JSON file or a HF tokenizer directory; ``eod_token`` names the
    end-of-document token instead of the tokenizer's own (files and directories only)."""
    if spec == "bytes":
        if eod_token is not None:
            raise ValueError(
                f"--eod-token / data.eod_token {eod_token!r} does not apply to the 'bytes' tokenizer, "
                "whose end-of-document id is 256: drop it"
            )
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        return HFTokenizer(path, eod_token)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {spec!r} does not exist: give {SPEC_FORMS}")
    return BPETokenizer(path, eod_token)


def require_eod(tokenizer: TextTokenizer, spec: str) -> int:
    """The tokenizer's end-of-document id; a ValueError saying what to pass when it has none."""
    if tokenizer.eod is None:
        raise ValueError(
            f"tokenizer {spec!r} has no end-of-document token (no {EOD_TOKEN} / eos token): pass "
            "--eod-token TOKEN (data.eod_token in a run config) naming the token that ends a document"
        )
    return tokenizer.eod


def train_bpe(texts: Iterable[str], vocab_size: int, output: Union[str, Path]) -> BPETokenizer:
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


def save_hf_tokenizer(tokenizer: TextTokenizer, directory: Union[str, Path]) -> None:
    """Write ``tokenizer`` as HF tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) into ``directory``, loadable by ``transformers.AutoTokenizer`` with
    the same ids for every text (no special tokens added) and the EOD as its eos token: a model
    export carries the tokenizer of the run, whatever its kind.

    * a tokenizers JSON file (:class:`BPETokenizer`): that tokenizer, wrapped;
    * a HF directory (:class:`HFTokenizer`): the loaded tokenizer, re-saved (eos set to the EOD);
    * ``bytes``: a byte-level model with no merges, id ``b`` for byte ``b`` and ``<|endoftext|>`` = 256.
    """
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    if isinstance(tokenizer, HFTokenizer):
        hf = tokenizer._tok
        if tokenizer.eod is not None:
            hf.eos_token = hf.convert_ids_to_tokens(tokenizer.eod)
        hf.save_pretrained(str(directory))
        return
    # The bytes tokenizer reads "<|endoftext|>" in a text as its bytes: so must the export.
    literal = not isinstance(tokenizer, BPETokenizer)
    backend = tokenizer._tok if not literal else _byte_level_tokenizer()
    eos = backend.id_to_token(tokenizer.eod) if tokenizer.eod is not None else None
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, clean_up_tokenization_spaces=False, split_special_tokens=literal
    )
    hf.save_pretrained(str(directory))


def _byte_level_tokenizer():
    """:class:`ByteTokenizer` as a ``tokenizers.Tokenizer``: byte-level pre-tokenization (each byte one
    symbol, no regex split), a BPE model without merges whose ids are the byte values, EOD 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
    if tok.token_to_id(EOD_TOKEN) != ByteTokenizer.eod:
        raise AssertionError(f"the byte tokenizer's EOD must be id {ByteTokenizer.eod}")
    return tok


def _bytes_to_unicode() -> dict:
    """The byte -> printable character map of byte-level BPE (GPT-2's), which ``ByteLevel``
    pre-tokenization applies: printable Latin-1 bytes map to themselves, the rest to 256 + n."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
