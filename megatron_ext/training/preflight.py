"""Checks of a run's inputs that need the filesystem, made before any work (the config's own checks
need none): each problem is one sentence naming the field and the fix, raised as a ConfigError.

:func:`check_inputs` runs in the entry points before the launch; :func:`check_init_from` in the job,
once its process group exists and before the run directory is touched (it is collective: the ranks
share the checksum pass).
"""

from __future__ import annotations

import pickle
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional

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
    if d.modality_loss_rescaling and d.kind == "indexed":
        text_only = [p for p in d.paths if not Path(f"{p}.modality.idx").is_file()]
        if text_only:
            problems.append(
                f"data.modality_loss_rescaling needs token-level modality ids, but {text_only} have no modality "
                "stream (P.modality.bin / .idx; a Megatron-LM prefix is text only): preprocess them with "
                "python -m data.preprocess, or drop data.modality_loss_rescaling"
            )
    if d.tokenizer is not None and d.kind != "indexed":  # indexed: checked against the data's manifests
        why = _tokenizer_problem(d.tokenizer, d.eod_token)
        if why is not None:
            problems.append(f"data.tokenizer={d.tokenizer}: {why}")
    if problems:
        raise ConfigError(problems)


def _tokenizer_problem(spec: str, eod_token: Optional[str]) -> Optional[str]:
    """Why ``data.tokenizer`` (with ``data.eod_token``) cannot be loaded, or None: a corrupt or foreign
    file, a directory without tokenizer files, a tokenizer without a vocabulary. What generation and
    evaluation encode with, so refused before a run trains for them."""
    from megatron_ext.data.tokenizers import load_tokenizer

    try:
        load_tokenizer(spec, eod_token)
    except (FileNotFoundError, ValueError, ImportError) as err:
        return str(err)
    return None


def check_init_from(cfg, run_dir: Path) -> None:
    """Refuse a ``train.init_from`` checkpoint of this project that is damaged or crafted, before the
    run directory is touched (collective: call on every rank of the job).

    The checkpoint's files must match its manifest (:func:`~megatron_ext.training.checkpoint.verify_checkpoint`,
    the check a resume makes: no file truncated, altered or missing, nor the manifest itself; the ranks
    share the checksums), and the two pickled files a load reads first must be plain data, read
    without running code: ``common.pt``
    (torch's weights-only unpickler) and ``.metadata`` (the restricted unpickler of
    :mod:`megatron_ext.compat.safe_load`). A crafted file whose manifest was rewritten to match passes
    the first check and not the second. Not checked where it is not read: a HF directory (converted by
    its own checks), or a run directory that already holds a checkpoint (the run resumes from it)."""
    from megatron_ext.run.checks import checkpoint_dir
    from megatron_ext.run.hf import is_hf_dir
    from megatron_ext.training.checkpoint import verify_checkpoint

    init_from = cfg.train.init_from
    if init_from is None or is_hf_dir(init_from) or _resumes(cfg, Path(run_dir)):
        return
    path = checkpoint_dir(init_from)
    if path is None:  # check_run names it
        return
    with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
        warnings.simplefilter("ignore")
        why = verify_checkpoint(path) or _not_plain_data(path)
    if why is not None:
        raise ConfigError(
            [
                f"train.init_from={init_from}: checkpoint {path} is damaged or not plain data: {why}. Nothing was "
                "loaded; give train.init_from an intact checkpoint (another step_* directory of that run, or its "
                "files restored from a copy you trust)"
            ]
        )


def _resumes(cfg, run_dir: Path) -> bool:
    """Whether the run resumes from a checkpoint of its own (then ``train.init_from`` is not read)."""
    checkpoints = run_dir / "checkpoints"
    return cfg.checkpoint.resume and any((p / "common.pt").is_file() for p in checkpoints.glob("step_*"))


def _not_plain_data(path: Path) -> Optional[str]:
    """Why checkpoint ``path``'s ``common.pt`` or ``.metadata`` is not plain data (a pickle that
    would run code, or not a pickle at all), or None. Nothing in them is executed."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_ext.compat.safe_load import UntrustedFileError, enable_safe_loading

    common = path / "common.pt"
    try:
        torch.load(common, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "")
        return f"{common} is not plain data ({found or 'it needs a full unpickler'}): refusing to load it"
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        return f"{common} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    enable_safe_loading()
    try:
        FileSystemReader(str(path)).read_metadata()
    except UntrustedFileError as err:
        return str(err)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as err:
        return f"{path / '.metadata'} cannot be read ({type(err).__name__}: {err})"
    return None
