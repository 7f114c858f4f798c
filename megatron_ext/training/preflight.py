"""Checks of a run's inputs that need the filesystem, made before any work (the config's own checks
need none): each problem is one sentence naming the field and the fix, raised as a ConfigError.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List

from megatron_ext.config import ConfigError

CACHED_KINDS = ("indexed", "default")
"""Data kinds whose index caches (and built corpus) go under ``data.cache_dir``."""


def _not_writable(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (created if missing), or None when they can."""
    for parent in (directory, *directory.parents):
        if parent.exists() and not parent.is_dir():
            return f"{parent} is a file, not a directory"
        if parent.exists():
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def check_inputs(cfg) -> None:
    """Raise ConfigError naming every filesystem input of ``cfg`` that the run could not use."""
    problems: List[str] = []
    d = cfg.data
    if d.kind in CACHED_KINDS:
        why = _not_writable(Path(d.cache_dir))
        if why is not None:
            problems.append(
                f"data.cache_dir={d.cache_dir}: the dataset index caches cannot be written there ({why}); "
                "set data.cache_dir to a writable directory"
            )
    if problems:
        raise ConfigError(problems)
