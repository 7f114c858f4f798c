"""The built-in corpus: real text and images that ship with the installed packages.

* text: the Python standard library's own modules, as found on this interpreter (each module's
  source is one document; its docstrings, extracted with ``ast``, are another);
* images: scikit-learn's handwritten digits (1,797 8x8 images, intensities 0..16), each pixel one
  token of a 17-entry image codebook, paired with a caption ("... the digit 7"), caption first or
  image first.

A byte-level BPE is trained on the text, everything is preprocessed into one prefix, and the
result is cached under ``<cache_dir>/default-v2`` so later runs reuse it.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path
from typing import Iterator, List, Tuple

from megatron_ext.data.indexed import DataError, paths
from megatron_ext.data.preprocess import PreprocessSummary, preprocess
from megatron_ext.data.tokenizers import train_bpe

VERSION = "default-v2"
TEXT_VOCAB = 2048
IMAGE_CODEBOOK = 17
MAX_TEXT_BYTES = 3_000_000
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "tkinter"}


def _stdlib_files() -> List[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))]
    chosen, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > MAX_TEXT_BYTES:
            break
        chosen.append(p)
        total += size
    return chosen


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    return "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)


def text_documents() -> Iterator[str]:
    for path in _stdlib_files():
        source = path.read_text(encoding="utf-8", errors="replace")
        yield source
        doc = _docstrings(source)
        if doc:
            yield doc


def image_documents() -> Iterator[dict]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        caption = {"modality": "text", "text": f"An 8x8 picture of a handwritten digit: the digit {label}."}
        pixels = {"modality": "image", "tokens": image.astype(int).reshape(-1).tolist()}
        yield {"segments": [caption, pixels] if i % 2 == 0 else [pixels, caption]}


def _records() -> Iterator[Tuple[str, int, dict]]:
    """Text and image documents interleaved evenly, so every split (contiguous document ranges
    in Megatron's GPTDataset) gets both modalities."""
    texts = [("stdlib", n, {"text": t}) for n, t in enumerate(text_documents())]
    images = [("sklearn-digits", n, r) for n, r in enumerate(image_documents())]
    for i, record in enumerate(images):
        j, k = i * len(texts) // len(images), (i + 1) * len(texts) // len(images)
        yield from texts[j:k]
        yield record


def default_vocab_size() -> int:
    """The vocabulary a model needs for the built-in corpus (its ids: BPE text, then the image
    codebook with its segment markers), known without building it."""
    from megatron_ext.data.vocab import VocabLayout

    return VocabLayout.build("", TEXT_VOCAB, 0, {"image": IMAGE_CODEBOOK}).size


def ensure_default_corpus(cache_dir: str | Path, workers: int = 1) -> str:
    """Build the corpus once (idempotent); return its dataset prefix."""
    root = Path(cache_dir) / VERSION
    prefix = root / "corpus"
    if paths(prefix)["manifest"].is_file():
        return str(prefix)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_path = root / "tokenizer.json"
    train_bpe(text_documents(), TEXT_VOCAB, tokenizer_path)
    summary: PreprocessSummary = preprocess(
        [],
        prefix,
        str(tokenizer_path),
        codebooks={"image": IMAGE_CODEBOOK},
        workers=workers,
        documents=_records(),
        progress=False,
    )
    if summary.tokens_per_modality.get("image", 0) == 0:
        raise DataError(f"{prefix}: the built-in corpus has no image tokens")
    stats = {**summary.__dict__, "tokens_per_second": summary.tokens_per_second}
    (root / "summary.json").write_text(json.dumps(stats, indent=1))
    return str(prefix)
