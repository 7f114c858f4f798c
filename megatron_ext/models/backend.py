"""Transformer Engine as a module backend: whether it imports here, and the sizes its FP8 GEMMs accept.

Which backend a run builds (``model.backend``: ``local``, ``te`` or ``auto``) is decided by the run
assembly (:mod:`megatron_ext.run.backend`), which asks the enabled capabilities what they need.
"""

from __future__ import annotations

import functools
from typing import List, Optional


@functools.lru_cache(maxsize=None)
def te_import_error() -> Optional[str]:
    """None when ``transformer_engine.pytorch`` imports here, else why not."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return f"{type(exc).__name__}: {exc}"
    return None


FP8_MULTIPLE = 16
"""FP8 GEMMs (Transformer Engine) need both matrix dimensions divisible by 16."""


def fp8_size_problems(sizes: dict) -> List[str]:
    """For ``train.precision: fp8``: the ``{YAML path: size}`` entries not divisible by 16."""
    odd = [f"{name}={value}" for name, value in sizes.items() if value and value % FP8_MULTIPLE]
    if not odd:
        return []
    return [
        f"train.precision='fp8': FP8 GEMMs need dimensions divisible by {FP8_MULTIPLE}; {', '.join(odd)} "
        f"{'is' if len(odd) == 1 else 'are'} not"
    ]
