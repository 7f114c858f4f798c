"""Loading a checkpoint or a dataset cache never runs code from the files.

A checkpoint someone else made is data, but three readers in the stack unpickle without limits:

* torch's ``FileSystemReader.read_metadata`` reads a dist-checkpoint's ``.metadata`` with
  ``pickle.load``: it gets an unpickler that resolves only the classes that file holds (torch's
  checkpoint metadata and plan records, ``torch.Size``, dtypes, layouts, memory formats);
* torch's ``DefaultLoadPlanner.load_bytes`` (under Megatron's load planner) reads every
  ``ShardedObject`` (our per-rank RNG states) with ``torch.load(weights_only=False)``: it gets
  ``weights_only=True``, with Megatron-Core's registered safe globals (numpy's RNG state arrays);
* Megatron's ``GPTDataset`` / ``BlendedDataset`` read their cached ``*.npy`` indices with
  ``numpy.load(allow_pickle=True)``: they get ``allow_pickle=False`` (the indices are integer arrays).

``common.pt`` is already read with torch's default ``weights_only=True``. A refused file raises
:class:`UntrustedFileError`, naming the file and what it asked for. Written for torch 2.13 and
megatron-core 0.16.1; checked on first use (:mod:`megatron_ext.compat.internals`).
"""

from __future__ import annotations

import io
import pickle
from contextlib import contextmanager
from typing import Any, List

from megatron_ext.compat.internals import Internal, require

INTERNALS = (
    Internal(
        "torch.distributed.checkpoint.filesystem",
        "FileSystemReader.read_metadata",
        source_contains=("pickle.load(metadata_file)",),
    ),
    Internal(
        "torch.distributed.checkpoint.default_planner",
        "DefaultLoadPlanner.load_bytes",
        parameters=("read_item", "value"),
        positional=True,
        source_contains=("torch.load(",),
    ),
    Internal(
        "megatron.core.datasets.gpt_dataset",
        "GPTDataset._build_document_sample_shuffle_indices",
        source_contains=("numpy.load(",),
    ),
    Internal(
        "megatron.core.datasets.blended_dataset", "BlendedDataset._build_indices", source_contains=("numpy.load(",)
    ),
)
"""Every internal this module relies on."""


class UntrustedFileError(pickle.UnpicklingError, ValueError):
    """A checkpoint or cache file asked to load something that is not plain data."""

    refused: List[str] = []
    """Messages of refusals not yet reported (torch's checkpoint reader wraps exceptions)."""

    def __init__(self, message: str):
        super().__init__(message)
        UntrustedFileError.refused.append(message)


@contextmanager
def refusals_reported():
    """Re-raise a refusal that happened inside a library call as the :class:`UntrustedFileError` it
    was (torch's distributed checkpoint loader wraps it in its own exception with every rank's
    traceback)."""
    UntrustedFileError.refused.clear()
    try:
        yield
    except UntrustedFileError:
        UntrustedFileError.refused.clear()
        raise
    except BaseException as err:  # torch's CheckpointException is a BaseException
        if UntrustedFileError.refused and not isinstance(err, (KeyboardInterrupt, SystemExit)):
            message = UntrustedFileError.refused[-1]
            UntrustedFileError.refused.clear()
            raise UntrustedFileError(message) from None
        raise


_CHECKPOINT_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
"""Modules whose classes (only classes) a ``.metadata`` file may name."""
_CHECKPOINT_NAMES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _CHECKPOINT_NAMES:
            return super().find_class(module, name)
        if module in _CHECKPOINT_MODULES and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        if (
            module == "torch"
            and "." not in name
            and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        ):
            return getattr(torch, name)
        raise UntrustedFileError(f"refers to {module}.{name}, which a checkpoint's metadata never holds")


def _restricted_metadata_load(file, *args, **kwargs):
    try:
        return _MetadataUnpickler(file).load()
    except UntrustedFileError as err:
        raise UntrustedFileError(
            f"{getattr(file, 'name', 'checkpoint metadata')} {err}: refusing to load it "
            "(the file may have been crafted; use a checkpoint from a source you trust)"
        ) from None


class _PickleWithRestrictedLoad:
    """``pickle`` for torch's filesystem reader: ``load`` restricted, the rest (``dump``) unchanged."""

    load = staticmethod(_restricted_metadata_load)

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)


def _load_bytes_weights_only(self, read_item, value: io.BytesIO) -> None:
    import torch
    from torch.distributed.checkpoint._nested_dict import set_element

    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        what = found[0] if found else "it needs a full unpickler"
        raise UntrustedFileError(
            f"checkpoint object {read_item.dest_index.fqn!r} is not plain data ({what}) and was "
            "not loaded: refusing it (the checkpoint may have been crafted; use one from a "
            "source you trust)"
        ) from None
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


class _NumpyWithoutPickle:
    """``numpy`` for Megatron's dataset modules: ``load`` never unpickles."""

    def __getattr__(self, name: str) -> Any:
        import numpy

        return getattr(numpy, name)

    @staticmethod
    def load(file, *args, **kwargs):
        import numpy

        kwargs["allow_pickle"] = False
        try:
            return numpy.load(file, *args, **kwargs)
        except ValueError as err:
            if "allow_pickle" not in str(err) and "Python objects" not in str(err):  # (memory-mapped reads)
                raise
            raise UntrustedFileError(
                f"{file}: a dataset index cache holds pickled objects, not an integer array; "
                "refusing to load it (delete the cache directory to rebuild it)"
            ) from None


def enable_safe_loading() -> None:
    """Install the three restrictions (idempotent, for the whole process)."""
    require("megatron_ext.compat.safe_load.enable_safe_loading", INTERNALS)
    from megatron.core.datasets import blended_dataset, gpt_dataset
    from torch.distributed.checkpoint import default_planner, filesystem

    if not isinstance(filesystem.pickle, _PickleWithRestrictedLoad):
        filesystem.pickle = _PickleWithRestrictedLoad()
    default_planner.DefaultLoadPlanner.load_bytes = _load_bytes_weights_only
    for module in (gpt_dataset, blended_dataset):
        if not isinstance(module.numpy, _NumpyWithoutPickle):
            module.numpy = _NumpyWithoutPickle()
