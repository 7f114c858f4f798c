"""Checkpoints that lose nothing and are never half-written.

Layout under ``<run-dir>/checkpoints/``::

    step_00000100/        a complete checkpoint (Megatron dist_checkpointing format)
    latest                text file naming the newest complete checkpoint
    .tmp-step_00000200/   a save in progress (ignored; removed by the next save)
    .old-step_00000100/   a checkpoint being re-saved, set aside until its replacement is published

Every checkpoint holds ``manifest.json``: the size and XXH3-128 checksum of each of its files, taken
before it is published. The writer processes checksum the sharded files while they write them
(:mod:`megatron_ext.compat.checkpoint_writer`); the few small files the ranks write themselves are
read back (the ranks share them). A save is published only once every file on disk has the size its
writer wrote. A resume verifies the manifest (the ranks again share the work; manifests of earlier
versions, with SHA-256 checksums, still verify) and falls back, with a warning, to the newest
checkpoint that verifies when a file is missing, truncated or altered, or when the manifest itself
is missing from a checkpoint that was written with one (its common state says so); it refuses,
naming the damage, only when none does.
Reading a checkpoint never unpickles code (:mod:`megatron_ext.compat.safe_load`); a file that cannot
be read is refused in one :class:`CheckpointError` naming it.

``latest`` is followed only when it names a complete checkpoint of this directory by its name.
Missing (deleted), naming nothing, or naming a path elsewhere (another run's checkpoint), it is
ignored with a warning, and the newest complete checkpoint of this directory is used instead.

A save writes everything into the temporary directory, then rank 0 renames it into place and
atomically replaces ``latest`` (write + fsync + ``os.replace``). A crash at any point leaves
``latest`` naming the previous complete checkpoint. Only after publishing are checkpoints beyond
the newest ``keep_last`` deleted.

An asynchronous save (``checkpoint.async_save``, Megatron's ``dist_checkpointing`` async strategy)
does the same in two halves: :meth:`CheckpointManager.save` writes the common state, plans the
shards and forks a process that writes them from a copy-on-write image of this moment (GPU tensors
are first copied to host memory) while training goes on; :meth:`CheckpointManager.finalize`, called
by every rank at step boundaries, publishes it (manifest, rename, ``latest``) once every rank's
writer has finished. One save is in flight at most; the end of a run waits for it.

Contents: every model chunk's sharded state (reshardable across TP / PP / EP), the optimizer's
sharded state (Adam moments follow their parameters' sharding), and common state from rank 0
(:class:`CommonState`: step, consumed samples, LR scheduler, capability states, the parallel
layout). RNG states are per rank (a ``ShardedObject`` per rank); they are restored only when the
layout is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_ext.config import ConfigError

LATEST = "latest"
MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_STEP_NAME = re.compile(r"step_[0-9]{8}")
WITH_MANIFEST = "with_manifest"
"""Key of the common state of checkpoints written with a manifest: without its manifest such a
checkpoint is unverified, not one of the older format."""
WITH_OPTIMIZER = "with_optimizer"
"""Key of the common state: whether the checkpoint holds optimizer state (one that starts a run, from an
import or an extraction, does not; older checkpoints lack the key: those with an LR schedule do)."""


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _sha256(path: Path) -> str:
    """The checksum of manifests written before XXH3-128 (still verified)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _share(items: List[str]) -> List[str]:
    """This rank's share of ``items`` (every ``world``-th, from its rank)."""
    if not dist.is_initialized():
        return items
    return items[dist.get_rank() :: dist.get_world_size()]


def _gather(part: Any) -> List[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [part]
    parts: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts


def _manifest_entry(path: Path) -> Dict[str, Any]:
    """``{"bytes", "xxh3_128"}`` of the file at ``path``: from the checksum its writer process left
    beside it (removed here), else read back. Raises CheckpointError when the file on disk is not the
    size its writer wrote."""
    from megatron_ext.compat.checkpoint_writer import CHECKSUM, CHECKSUM_SUFFIX, file_checksum

    size = path.stat().st_size
    written = path.with_name(path.name + CHECKSUM_SUFFIX)
    if not written.is_file():
        return {"bytes": size, CHECKSUM: file_checksum(path)}
    entry = json.loads(written.read_text())
    written.unlink()
    if entry["bytes"] != size:
        raise CheckpointError(f"{path.name} has {size} bytes on disk, but its writer wrote {entry['bytes']}")
    return entry


def write_manifest(directory: Path) -> None:
    """Record the size and checksum of every file of a written checkpoint (collective: each rank
    takes a share) and let rank 0 write ``manifest.json``. Raises CheckpointError on every rank when
    a file is not as it was written."""
    from megatron_ext.compat.checkpoint_writer import CHECKSUM_SUFFIX

    names = sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(CHECKSUM_SUFFIX)
    )
    mine, problems = {}, []
    for name in _share(names):
        try:
            mine[name] = _manifest_entry(directory / name)
        except (CheckpointError, OSError, ValueError, KeyError) as err:
            problems.append(str(err))
    parts = _gather((mine, problems))
    problems = sorted(p for _, part in parts for p in part)
    if problems:
        raise CheckpointError("; ".join(problems))
    files = {k: v for part, _ in parts for k, v in part.items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        _fsync_write(directory / MANIFEST, json.dumps({"files": dict(sorted(files.items()))}, indent=1))


def _matches(path: Path, want: Dict[str, Any]) -> bool:
    """Whether the file at ``path`` has the checksum its manifest entry ``want`` records (XXH3-128, or
    SHA-256 in a manifest of an earlier version)."""
    from megatron_ext.compat.checkpoint_writer import CHECKSUM, file_checksum

    if CHECKSUM in want:
        return file_checksum(path) == want[CHECKSUM]
    return "sha256" in want and _sha256(path) == want["sha256"]


def _read_common(directory: Path) -> Dict[str, Any]:
    """The ``common`` dict of checkpoint ``directory`` (weights-only: never unpickles code); raises
    :class:`CheckpointError` naming ``common.pt`` and why it cannot be read."""
    try:
        common = torch.load(Path(directory) / "common.pt", map_location="cpu", weights_only=True)
        return dict(common["common"])
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "")
        raise CheckpointError(
            f"{Path(directory) / 'common.pt'} is not plain data ({reason or 'it needs a full unpickler'}): "
            "refusing to load it (the checkpoint may have been crafted; use one from a source you trust)"
        ) from None
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as err:
        raise CheckpointError(
            f"{Path(directory) / 'common.pt'} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None


def verify_checkpoint(directory: Path) -> Optional[str]:
    """None when every file of ``directory`` matches its manifest, else what does not (the same
    answer on every rank; collective). A checkpoint without a manifest is accepted only when it was
    written before manifests existed (its common state lacks :data:`WITH_MANIFEST`)."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        try:
            common = _read_common(directory)
        except CheckpointError as err:
            return f"{MANIFEST} is missing and {err}"
        return f"{MANIFEST} is missing" if common.get(WITH_MANIFEST) else None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is not a readable manifest"

    def problem(name: str) -> Optional[str]:
        path, want = directory / name, files[name]
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, not {want['bytes']}"
        return None if _matches(path, want) else f"{name} does not match its checksum"

    # The files are hashed side by side (the hash releases the GIL): a rank's share is a few large files.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        problems = [p for p in pool.map(problem, _share(sorted(files))) if p is not None]
    problems = sorted(p for part in _gather(problems) for p in part)
    return "; ".join(problems) if problems else None


def parallel_layout() -> Dict[str, int]:
    """This job's parallel layout, stored with each checkpoint."""
    from megatron.core import parallel_state as ps

    return {
        "world": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
    }


def rng_state() -> Dict[str, Any]:
    """Every RNG this rank draws from (Python, numpy, torch CPU, CUDA, Megatron's tracker)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _model_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


def _model_state(model: List[torch.nn.Module]) -> Dict[str, Any]:
    """Every model chunk's sharded state dict, keyed as checkpoints store them."""
    return {_model_key(i, len(model)): _chunk_state(getattr(chunk, "module", chunk)) for i, chunk in enumerate(model)}


def _chunk_state(chunk: torch.nn.Module) -> Dict[str, Any]:
    if getattr(chunk, "mtp_process", False) and not getattr(chunk, "pre_process", True):
        # A last stage with the MTP block holds a copy of the embedding, tied to the first stage's
        # in the checkpoint over the data-parallel group (Megatron reads it from the metadata).
        from megatron_ext.parallel.state import process_groups

        return chunk.sharded_state_dict(metadata={"dp_cp_group": process_groups().dp_cp})
    return chunk.sharded_state_dict()


EXTRA_STATE = "._extra_state"


def _drop_absent_extra_state(state: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """``state`` without the module extra states (``*._extra_state`` objects) that checkpoint ``path``
    does not hold. Transformer Engine modules keep their FP8 scaling history there; a checkpoint of the
    local backend has none for some of them (TE's attention, norms), and those start afresh, as in a
    new run. Everything else must be in the checkpoint (dist_checkpointing says what is missing)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    saved = None

    def keep(value) -> bool:
        nonlocal saved
        if not (isinstance(value, ShardedObject) and value.key.endswith(EXTRA_STATE)):
            return True
        if saved is None:  # objects are listed by their unique key: name, shard offset and count
            saved = set(load_sharded_metadata(str(path)))
        return value.unique_key in saved

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items() if keep(v)}
        return node

    return walk(state)


def _load_model_state(model: List[torch.nn.Module], loaded: Dict[str, Any]) -> None:
    for i, chunk in enumerate(model):
        module = getattr(chunk, "module", chunk)
        result = module.load_state_dict(loaded[_model_key(i, len(model))], strict=False)
        # Only extra states the checkpoint lacked (see _drop_absent_extra_state) may be missing.
        missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"checkpoint does not match the model: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}"
            )


def load_model_weights(path: Path, model: List[torch.nn.Module]) -> None:
    """Load only the model weights of checkpoint ``path`` (saved at any layout) into ``model``.

    Before anything is read, the checkpoint's model tensors are matched against the model's (names
    and global shapes); a mismatch raises ValueError listing what differs.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_ext.compat.safe_load import enable_safe_loading, refusals_reported

    enable_safe_loading()
    problem = verify_checkpoint(Path(path))
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    state = _model_state(model)
    wanted = {t.key: tuple(t.global_shape) for t in nested_values(state) if isinstance(t, ShardedTensor)}
    with refusals_reported(), unreadable_reported(path):
        saved = {key: tuple(t.global_shape) for key, t in dist_checkpointing.load_tensors_metadata(str(path)).items()}
    # This rank's chunks hold some of the model's tensors; every rank checks its own.
    missing = sorted(k for k in wanted if k not in saved)
    reshaped = sorted(
        f"{k}: checkpoint {saved[k]}, model {wanted[k]}" for k in wanted if k in saved and saved[k] != wanted[k]
    )
    if missing or reshaped:
        lines = [f"missing {k}" for k in missing[:8]] + reshaped[:8]
        more = len(missing) + len(reshaped) - len(lines)
        raise ConfigError(
            [
                f"train.init_from: {path} does not fit this model ({len(missing)} tensors missing, "
                f"{len(reshaped)} of another shape): "
                + "; ".join(lines)
                + (f"; and {more} more" if more > 0 else "")
                + ". Use a checkpoint of the same model shape (model and moe sections)."
            ]
        )
    with refusals_reported(), unreadable_reported(path):
        loaded = dist_checkpointing.load(_drop_absent_extra_state(state, Path(path)), str(path))
    _load_model_state(model, loaded)


@contextmanager
def unreadable_reported(path: Path):
    """Turn a failure to read checkpoint ``path`` (a file damaged or crafted past its manifest, or a
    checkpoint without one) into one :class:`CheckpointError` naming the checkpoint and the reason,
    instead of torch's exception holding every rank's traceback."""
    from megatron_ext.compat.safe_load import UntrustedFileError

    try:
        yield
    except (UntrustedFileError, CheckpointError, ConfigError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException is a BaseException
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({_first_cause(err)}): a file of it is damaged or not a checkpoint "
            "file; restore it, or remove this checkpoint to resume from an older one"
        ) from None


def _first_cause(err: BaseException) -> str:
    """``err`` in one line: the first rank's exception when torch gathered every rank's (its
    CheckpointException), the innermost one when Megatron wrapped it (``Worker failure: ...``)."""
    failures = getattr(err, "failures", None)
    cause = next(iter(failures.values()))[0] if isinstance(failures, dict) and failures else err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def check_steps_reach(path: Path, steps: int) -> None:
    """Refuse to resume checkpoint ``path`` in a run that ends before its step (``train.steps`` lowered
    below it): the run would train nothing and re-save the checkpoint as if it had."""
    step = int(Path(path).name.removeprefix(_OLD_PREFIX).split("_")[1])
    if steps < step:
        raise ConfigError(
            [
                f"train.steps={steps}, but this run resumes from {Path(path).name} at step {step}: set train.steps "
                f"to {step} or more to go on, or start a new run directory (or checkpoint.resume=false)"
            ]
        )


class CheckpointError(ValueError):
    """No usable checkpoint: every candidate is damaged."""


@dataclass
class CommonState:
    """What a checkpoint holds beside the sharded model, optimizer and RNG states: the run's
    position and the state of the objects that are not tensors.

    On disk it is the plain dict of :meth:`to_dict` under the ``common`` key (``common.pt``, which
    every rank reads without unpickling code); :meth:`from_dict` reads it back, including the dicts
    written before this class existed, whose missing keys take the defaults below.
    """

    step: int = 0
    """Optimizer steps completed; the checkpoint's directory is named after it."""
    consumed_samples: int = 0
    """Training samples drawn so far: where the data order resumes."""
    skipped_steps: int = 0
    """Steps whose update was skipped (non-finite gradients), carried on into the metrics."""
    scheduler: Optional[Dict[str, Any]] = None
    """The LR scheduler's state dict; None in a checkpoint that starts a run (import, extraction)."""
    callbacks: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """Each callback's state, keyed by its name: what capabilities grew or learned besides the weights."""
    layout: Dict[str, int] = field(default_factory=dict)
    """The parallel layout that wrote the checkpoint (:func:`parallel_layout`); the per-rank RNG
    states are restored only under the same one."""
    extracted_from: Optional[Dict[str, Any]] = None
    """Provenance of a sub-model checkpoint: the run, checkpoint and sub-network it was cut from."""
    imported_from: Optional[Dict[str, Any]] = None
    """Provenance of an imported checkpoint: the HF directory and its model type."""
    restored_rng: bool = False
    """Not stored: set by :meth:`CheckpointManager.load`, whether this rank's RNG states were
    restored (the same layout, and the optimizer loaded); otherwise the RNG streams restart."""
    restored_optimizer: bool = False
    """Not stored: set by :meth:`CheckpointManager.load`, whether the optimizer state (and with it
    the LR schedule in :attr:`scheduler`) was loaded: asked for, and the checkpoint has one (one that
    starts a run, written by an import or an extraction, has none)."""

    def callback_state(self, callback) -> Dict[str, Any]:
        """``callback``'s saved state: under its name, or one of its older names
        (:attr:`~megatron_ext.capability.Callback.state_aliases`); empty when the checkpoint has none."""
        for name in (callback.name, *callback.state_aliases):
            if name in self.callbacks:
                return self.callbacks[name]
        return {}

    def to_dict(self) -> Dict[str, Any]:
        """The dict saved under ``common``, with its keys in the order earlier versions wrote them;
        provenance keys only where set."""
        state = {
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
            "scheduler": self.scheduler,
            "callbacks": self.callbacks,
        }
        for key in ("extracted_from", "imported_from"):
            if getattr(self, key) is not None:
                state[key] = getattr(self, key)
        state.update(layout=self.layout, step=self.step)
        return state

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> CommonState:
        """Read the ``common`` dict of a checkpoint, of this version or an earlier one (without
        ``skipped_steps`` or ``callbacks``); unknown keys are ignored."""
        return cls(
            step=state["step"],
            consumed_samples=state.get("consumed_samples", 0),
            skipped_steps=state.get("skipped_steps", 0),
            scheduler=state.get("scheduler"),
            callbacks=state.get("callbacks") or {},
            layout=state["layout"],
            extracted_from=state.get("extracted_from"),
            imported_from=state.get("imported_from"),
        )


def check_async_save_supported() -> None:
    """Refuse ``checkpoint.async_save`` where Megatron's async caller cannot run: it synchronizes and
    all-reduces on ``torch.cuda.current_device()``, which a process without a GPU has only under the
    CPU mode (:func:`megatron_ext.compat.cpu.enable_cpu_support`)."""
    from megatron_ext.compat.cpu import cpu_support_active

    if not torch.cuda.is_available() and not cpu_support_active():
        raise ConfigError(
            [
                "checkpoint.async_save=true needs a GPU or the CPU mode (megatron_ext.compat.cpu.enable_cpu_support, "
                "which training enables): set checkpoint.async_save=false"
            ]
        )


class CheckpointManager:
    """Save / find / load checkpoints of one run directory (all methods called on every rank)."""

    def __init__(self, root: Path, keep_last: int, async_save: bool = False):
        from megatron_ext.compat.checkpoint_writer import use_write_results_queue
        from megatron_ext.launch.orphans import die_with_parent

        if async_save:
            check_async_save_supported()
        # Saves must survive SIGTERM to the process group; their writer processes die with the rank.
        use_write_results_queue(writer_start=die_with_parent, async_save=async_save)
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self._calls = None  # Megatron's AsyncCallsQueue, created with the first asynchronous save
        self._in_flight: Optional[Path] = None  # the checkpoint an asynchronous save is writing

    def complete(self) -> List[Path]:
        """This directory's complete checkpoints (``step_*``, and one set aside by an interrupted
        re-save), newest first."""
        candidates = [p for p in self.root.glob("step_*") if _STEP_NAME.fullmatch(p.name)]
        candidates += [
            p for p in self.root.glob(f"{_OLD_PREFIX}step_*") if _STEP_NAME.fullmatch(p.name.removeprefix(_OLD_PREFIX))
        ]
        complete = [p for p in candidates if (p / "common.pt").is_file()]
        return sorted(complete, key=lambda p: (p.name.removeprefix(_OLD_PREFIX), p.name.startswith(_OLD_PREFIX)))[::-1]

    def latest(self, log=warnings.warn) -> Optional[Path]:
        """The newest complete checkpoint, or None when the directory has none.

        Normally the one ``latest`` names. When the pointer is missing, names something that is not
        a complete checkpoint (edited, or a crash interrupted a re-save of the same step between its
        two renames) or names a path outside this directory, the newest complete ``step_*``
        directory here is used instead, and ``log`` says so."""
        pointer = self.root / LATEST
        named = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
        if named is not None and _STEP_NAME.fullmatch(named) and (self.root / named / "common.pt").is_file():
            return self.root / named
        complete = self.complete()
        if not complete:
            if named is None:
                return None
            raise CheckpointError(
                f"{pointer} names {named!r}, which is not a complete checkpoint of {self.root}, and no complete "
                f"step_* checkpoint is there: remove {pointer} to start afresh"
            )
        if named is None:
            why = "is missing"
        elif not _STEP_NAME.fullmatch(named):
            why = f"names {named!r}, which is not a checkpoint of this run directory (ignored)"
        else:
            why = f"names {named}, which is not a complete checkpoint"
        log(f"warning: {pointer} {why}; using the newest complete checkpoint of this run, {complete[0].name}")
        return complete[0]

    def latest_verified(self, log=warnings.warn) -> Optional[Path]:
        """The newest complete checkpoint whose files match their manifest (collective), or None when
        the run has none. Skipping a damaged one is reported through ``log``; raises
        :class:`CheckpointError` when checkpoints exist but none verifies."""
        first = self.latest(log=log)
        if first is None:
            return None
        older = [p for p in self.complete() if p.name.removeprefix(_OLD_PREFIX) < first.name.removeprefix(_OLD_PREFIX)]
        damaged = []
        for path in [first, *older]:
            problem = verify_checkpoint(path)
            if problem is None:
                if damaged:
                    log(
                        f"checkpoint {damaged[-1][0].name} is damaged ({damaged[-1][1]}); resuming from {path.name}, "
                        "the newest checkpoint that verifies"
                    )
                return path
            damaged.append((path, problem))
        raise CheckpointError(
            f"no checkpoint in {self.root} verifies: "
            + "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
            + ". Restore the files, or start afresh in a new run directory"
        )

    def _sharded_state(self, model, optimizer, is_loading: bool) -> Dict[str, Any]:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        state = _model_state(model)
        if optimizer is not None:  # the map from parameters to shards walks every chunk's dict
            state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading)
        rank, world = dist.get_rank(), dist.get_world_size()
        state["rng"] = ShardedObject(
            "rng_state", rng_state() if not is_loading else None, (world,), (rank,), replica_id=0
        )
        return state

    def save(self, step: int, model: List[torch.nn.Module], optimizer, common: CommonState) -> Path:
        """Write checkpoint ``step`` and publish it atomically; returns its directory. ``common`` is
        stored with ``step`` and this job's layout. An asynchronous save returns once the shards'
        writer is started; :meth:`finalize` publishes it (a save waits for the one in flight first)."""
        from megatron.core import dist_checkpointing

        self.finalize(blocking=True)
        final = self.root / _step_dir_name(step)
        tmp = self.root / f"{_TMP_PREFIX}{final.name}"
        problem = None
        if dist.get_rank() == 0:
            try:
                self._prepare(tmp)
            except OSError as err:  # a filesystem turned read-only or full since the run began
                problem = f"{type(err).__name__}: {err}"
        problem = _gather(problem)[0]  # every rank fails alike
        if problem is not None:
            raise self._failed(final, problem)
        state = self._sharded_state(model, optimizer, is_loading=False)
        state["common"] = {
            **replace(common, layout=parallel_layout(), step=step).to_dict(),
            WITH_MANIFEST: True,
            WITH_OPTIMIZER: optimizer is not None,
        }
        with self._failure_reported(final, tmp):
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=self.async_save)
        if not self.async_save:
            with self._failure_reported(final, tmp):
                dist.barrier()
                self._publish(final, tmp)
            return final
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        from megatron_ext.compat.checkpoint_writer import in_save_process
        from megatron_ext.launch.orphans import die_with_parent

        if request.async_fn is not None:  # a rank with shards to write forks their writer, which dies with it
            request = request._replace(async_fn=in_save_process(die_with_parent, request.async_fn))
        request.add_finalize_fn(functools.partial(self._publish, final, tmp))
        self._calls = self._calls or AsyncCallsQueue()
        with self._failure_reported(final, tmp):
            self._calls.schedule_async_request(request)
        self._in_flight = final
        return final

    def finalize(self, blocking: bool) -> Optional[Path]:
        """Publish the asynchronous save in flight if every rank's writer has finished (with
        ``blocking``: once they have); returns its directory when published now, else None. Collective:
        every rank calls it at the same points (a no-op without a save in flight)."""
        if self._in_flight is None:
            return None
        final = self._in_flight
        with self._failure_reported(final, self.root / f"{_TMP_PREFIX}{final.name}"):
            try:
                done = self._calls.maybe_finalize_async_calls(blocking=blocking)
            finally:  # a failed save is over too: its request has left Megatron's queue
                if not self._calls.get_num_unfinalized_calls():
                    self._in_flight = None
        return final if done else None

    def _prepare(self, tmp: Path) -> None:
        """Rank 0: an empty temporary directory for the next save, and the leftovers of interrupted
        saves cleared away."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.root.glob(f"{_OLD_PREFIX}*"):  # a re-save interrupted by a crash
            original = self.root / stale.name[len(_OLD_PREFIX) :]
            if (original / "common.pt").is_file():  # its replacement is in place: drop the old one
                shutil.rmtree(stale, ignore_errors=True)
            else:  # it never was: put the old one back
                shutil.rmtree(original, ignore_errors=True)
                os.replace(stale, original)
        tmp.mkdir()

    @contextmanager
    def _failure_reported(self, final: Path, tmp: Path):
        """A save that fails (a full disk, a writer that died) is one CheckpointError saying that the
        previous checkpoint stays the latest; its temporary directory is removed."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # torch's CheckpointException is a BaseException
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._failed(final, _first_cause(err)) from None

    def _failed(self, final: Path, cause: str) -> CheckpointError:
        return CheckpointError(
            f"saving checkpoint {final.name} failed ({cause}); {self.root / LATEST} still names the previous "
            "complete checkpoint: free space or fix the filesystem, then re-run the same command to resume from it"
        )

    def _publish(self, final: Path, tmp: Path) -> None:
        """Every file of the save in ``tmp`` written (on every rank): record them in its manifest,
        then rank 0 renames it to ``final`` and points ``latest`` at it (collective)."""
        write_manifest(tmp)
        dist.barrier()
        if dist.get_rank() == 0:
            old = None
            if final.exists():  # re-saving the same step (e.g. end of a resumed, finished run)
                # Set aside by a rename, removed only after the new one is in place and published:
                # a crash in between leaves the old one (or, from latest(), the newest complete one).
                old = self.root / f"{_OLD_PREFIX}{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_write(self.root / LATEST, final.name)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune(keep=final)
        dist.barrier()

    def _prune(self, keep: Path) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model: List[torch.nn.Module], optimizer, load_optimizer: bool) -> CommonState:
        """Load ``path`` into ``model`` (and ``optimizer``); return the common state.

        Model weights load at any parallel layout (dist_checkpointing reshards them). Optimizer
        state reshards too; RNG states are restored only if the layout is unchanged.
        """
        from megatron.core import dist_checkpointing

        from megatron_ext.compat.safe_load import enable_safe_loading, refusals_reported

        enable_safe_loading()
        raw = _read_common(Path(path))
        try:
            common = CommonState.from_dict(raw)
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{Path(path) / 'common.pt'} is not a checkpoint's common state ({err!r})") from None
        same_layout = common.layout == parallel_layout()
        has_optimizer = raw.get(WITH_OPTIMIZER, common.scheduler is not None)
        load_optimizer = load_optimizer and optimizer is not None and bool(has_optimizer)
        state = self._sharded_state(model, optimizer if load_optimizer else None, is_loading=True)
        if not same_layout:
            state.pop("rng")
        with refusals_reported(), unreadable_reported(path):
            loaded = dist_checkpointing.load(_drop_absent_extra_state(state, Path(path)), str(path))
        _load_model_state(model, loaded)
        if load_optimizer:
            optimizer.load_state_dict(loaded["optimizer"])
        if same_layout and load_optimizer:
            set_rng_state(loaded["rng"])
        common.restored_rng = same_layout and load_optimizer
        common.restored_optimizer = load_optimizer
        return common
