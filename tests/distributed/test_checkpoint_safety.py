"""Untrusted and damaged files: a crafted checkpoint or dataset cache never runs code (each path is
refused with a message); a damaged latest checkpoint (a file truncated, zeroed, deleted, a bit
flipped) is detected by its manifest and the run resumes from the newest one that verifies, with
the same losses as a run that was never damaged."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from tests.configs import TINY, merge

CONFIG = merge(
    TINY,
    {
        "model": {"num_query_groups": None},
        "data": {"kind": "synthetic"},
        "train": {"global_batch_size": 2, "steps": 6, "warmup_steps": 1, "eval_interval": 0},
        "checkpoint": {"save_interval": 2, "keep_last": 3, "save_at_end": True},
    },
)


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _train(run_dir, steps, **changes):
    from megatron_ext.training.loop import Trainer

    lines = []
    cfg = from_dict(RunConfig, {**CONFIG, "train": {**CONFIG["train"], "steps": steps}, **changes})
    summary = Trainer(cfg, Path(run_dir), log=lines.append).run()
    return summary.losses, lines


def _rewrite_manifest(step_dir: Path):
    """What a forger does: make the manifest agree with the altered files."""
    from megatron_ext.training.checkpoint import write_manifest

    write_manifest(step_dir)


def crafted_metadata(run_dir, marker):
    from megatron_ext.compat.safe_load import UntrustedFileError

    _train(run_dir, 2)
    step = Path(run_dir) / "checkpoints" / "step_00000002"
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _rewrite_manifest(step)
    with pytest.raises(UntrustedFileError) as err:
        _train(run_dir, 4)
    return str(err.value)


def crafted_sharded_object(run_dir, marker):
    from megatron_ext.compat.safe_load import UntrustedFileError
    from megatron_ext.training import checkpoint

    original = checkpoint.rng_state
    checkpoint.rng_state = lambda: {"python": Payload(marker)}  # pickled into the per-rank RNG object
    try:
        _train(run_dir, 2)
    finally:
        checkpoint.rng_state = original
    with pytest.raises(UntrustedFileError) as err:
        _train(run_dir, 4)
    return str(err.value)


def crafted_dataset_cache(run_dir, cache, marker):
    from megatron_ext.compat.safe_load import UntrustedFileError
    from megatron_ext.run.datasets import build_datasets

    cfg = from_dict(
        RunConfig,
        {
            **CONFIG,
            "model": {**CONFIG["model"], "vocab_size": 384},
            "data": {
                "kind": "indexed",
                "paths": [str(Path(cache) / "corpus")],
                "seq_length": 16,
                "cache_dir": str(Path(cache) / "index"),
            },
        },
    )
    build_datasets(cfg)
    index = sorted((Path(cache) / "index").rglob("*.npy"))
    assert index, "Megatron wrote no index cache"
    np.save(index[0], np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(UntrustedFileError) as err:
        build_datasets(cfg)
    return str(err.value)


@pytest.mark.parametrize("path", ["metadata", "sharded_object", "dataset_cache"])
def test_a_crafted_file_is_refused_and_runs_nothing(path, tmp_path):
    marker = tmp_path / "owned"
    if path == "metadata":
        message = run_distributed(crafted_metadata, 1, None, run_dir=str(tmp_path / "run"), marker=str(marker))[0]
        assert "refers to posix.system" in message and "refusing to load" in message, message
    elif path == "sharded_object":
        message = run_distributed(crafted_sharded_object, 1, None, run_dir=str(tmp_path / "run"), marker=str(marker))[0]
        assert "rng_state" in message and "not plain data" in message, message
    else:
        from megatron_ext.data.preprocess import preprocess

        docs = tmp_path / "docs.jsonl"
        docs.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
        preprocess([str(docs)], str(tmp_path / "cache" / "corpus"), "bytes", {}, 1, "text")
        message = run_distributed(
            crafted_dataset_cache,
            1,
            None,
            run_dir=str(tmp_path / "run"),
            cache=str(tmp_path / "cache"),
            marker=str(marker),
        )[0]
        assert "pickled objects" in message and "refusing" in message, message
    print(f"[safety] {path}: {message}")
    assert not marker.exists(), "the crafted file ran its code"


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "zero":
        path.write_bytes(bytes(len(data)))
    elif how == "delete":
        path.unlink()
    else:  # one bit of tensor data
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def damaged_then_resumed(run_dir, how):
    reference, _ = _train(Path(run_dir) / "straight", 6)
    damaged = Path(run_dir) / "damaged"
    _train(damaged, 4)  # checkpoints at 2 and 4
    _damage(sorted((damaged / "checkpoints" / "step_00000004").glob("*.distcp"))[0], how)
    losses, lines = _train(damaged, 6)
    return reference, losses, lines


@pytest.mark.parametrize("how", ["truncate", "zero", "delete", "bitflip"])
def test_a_damaged_checkpoint_falls_back_to_the_newest_that_verifies(how, tmp_path):
    reference, resumed, lines = run_distributed(damaged_then_resumed, 1, None, run_dir=str(tmp_path), how=how)[0]
    notes = [line for line in lines if "is damaged" in line]
    print(f"[damaged] {how}: {notes}")
    assert len(notes) == 1 and "step_00000004" in notes[0] and "resuming from step_00000002" in notes[0], lines
    assert resumed == reference[2:]  # steps 3..6 again, bitwise as the undamaged run


def nothing_verifies(run_dir):
    from megatron_ext.training.checkpoint import CheckpointError

    _train(run_dir, 2)
    _damage(sorted((Path(run_dir) / "checkpoints" / "step_00000002").glob("*.distcp"))[0], "bitflip")
    with pytest.raises(CheckpointError) as err:
        _train(run_dir, 4)
    return str(err.value)


def test_no_verifying_checkpoint_is_refused_with_the_damage_named(tmp_path):
    message = run_distributed(nothing_verifies, 1, None, run_dir=str(tmp_path))[0]
    assert "no checkpoint" in message and "does not match its checksum" in message, message
