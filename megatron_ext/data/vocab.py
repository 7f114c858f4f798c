"""One id space for every modality, ERNIE-5.0 style: text ids first, then per-modality codebooks.

    [0, text_size)                       text tokenizer ids (its own EOD included)
    for each non-text modality m, in order:
      [m.offset, m.offset + codebook)    m's discrete codes (image / audio tokenizer output)
      m.begin, m.end                     begin / end of an m segment (two ids after the codes)

The layout, with the text tokenizer's identity, is the vocabulary manifest stored with the data;
training checks it against the model. A modality id (its index in ``MODALITIES``) accompanies
every token; routing never reads it, losses and statistics do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from megatron_ext.config.sections import MODALITIES

__all__ = ["MODALITIES", "ModalityRange", "VocabLayout"]


@dataclass
class ModalityRange:
    name: str
    codebook_size: int
    offset: int

    @property
    def begin(self) -> int:
        return self.offset + self.codebook_size

    @property
    def end(self) -> int:
        return self.offset + self.codebook_size + 1


@dataclass
class VocabLayout:
    """The shared id space; ``size`` is the vocabulary the model must have (at least)."""

    tokenizer: str
    """Identity of the text tokenizer (kind and content hash)."""
    text_size: int
    """Number of text ids (the text tokenizer's vocabulary)."""
    eod: Optional[int]
    """End-of-document id (a text id); None where unknown: Megatron-LM data read without
    ``data.tokenizer``; read only where samples are cut at document ends (position ids and
    attention masks reset there, or the EOD's loss masked)."""
    modalities: List[ModalityRange] = field(default_factory=list)

    @classmethod
    def build(cls, tokenizer: str, text_size: int, eod: int, codebooks: Dict[str, int]) -> "VocabLayout":
        ranges, offset = [], text_size
        for name, size in codebooks.items():
            if name not in MODALITIES or name == "text":
                raise ValueError(f"modality {name!r} is not one of {MODALITIES[1:]}")
            if size <= 0:
                raise ValueError(f"codebook size of {name!r} must be positive, got {size}")
            ranges.append(ModalityRange(name, size, offset))
            offset += size + 2
        return cls(tokenizer=tokenizer, text_size=text_size, eod=eod, modalities=ranges)

    @property
    def size(self) -> int:
        return self.modalities[-1].end + 1 if self.modalities else self.text_size

    def modality(self, name: str) -> ModalityRange:
        for m in self.modalities:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.modalities) or "none"
        raise KeyError(f"modality {name!r} is not in this vocabulary (has: {known})")

    def modality_of_ids(self) -> np.ndarray:
        """``table[id]`` = modality id of token ``id`` (uint8, length ``size``)."""
        table = np.zeros(self.size, dtype=np.uint8)
        for m in self.modalities:
            table[m.offset : m.end + 1] = MODALITIES.index(m.name)
        return table

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VocabLayout":
        return cls(
            tokenizer=data["tokenizer"],
            text_size=data["text_size"],
            eod=data["eod"],
            modalities=[ModalityRange(**m) for m in data["modalities"]],
        )
