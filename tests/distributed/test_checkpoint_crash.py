"""A crash (hard process exit) in the middle of a checkpoint save leaves the previous one usable."""

import os
from pathlib import Path

import pytest
import torch

from megatron_ext.config import from_dict
from megatron_ext.optim import build_optimizer
from megatron_ext.parallel import full_named_tensors
from megatron_ext.run import RunConfig
from megatron_ext.run.builder import build_model
from megatron_ext.testing.distributed import DistributedTaskError, run_distributed
from megatron_ext.training import checkpoint
from megatron_ext.training.ddp import wrap_with_ddp
from megatron_ext.training.loop import optimizer_config
from tests.configs import TINY

# The tiny model with one KV head per query head: only the model and its optimizer are built.
CONFIG = {"model": {**TINY["model"], "num_query_groups": None}, "data": dict(TINY["data"])}


def _build(seed):
    torch.manual_seed(seed)
    cfg = from_dict(RunConfig, CONFIG)
    model = wrap_with_ddp(build_model(cfg, cuda=False))
    return model, build_optimizer(optimizer_config(cfg, cuda=False), model)


def save_then_crash(root, crash_point):
    model, optimizer = _build(seed=1)
    manager = checkpoint.CheckpointManager(Path(root), keep_last=2)
    manager.save(1, model, optimizer, checkpoint.CommonState(consumed_samples=8))
    torch.save(full_named_tensors(model[0]), Path(root) / "expected.pt")
    with torch.no_grad():
        for param in model[0].parameters():
            param.add_(1.0)

    def die(*args, **kwargs):
        if crash_point == "write":  # part of the files are on disk, then the process is killed
            Path(args[1], "__0_0.distcp").write_bytes(b"partial")
        os._exit(17)

    if crash_point == "write":
        from megatron.core import dist_checkpointing

        dist_checkpointing.save = die
    elif crash_point == "resave":  # re-saving step 1: after setting the old one aside, before the new is in
        renames = []
        original_replace = os.replace

        def replace(src, dst):
            if Path(src).is_dir():  # the directory renames (file replaces write the manifest, latest)
                renames.append((src, dst))
                if len(renames) == 2:
                    die()
            original_replace(src, dst)

        checkpoint.os.replace = replace
        manager.save(1, model, optimizer, checkpoint.CommonState(consumed_samples=16))
    else:  # after the rename into place, before the 'latest' pointer is replaced
        checkpoint._fsync_write = die
    manager.save(2, model, optimizer, checkpoint.CommonState(consumed_samples=16))


def load_latest_and_save_again(root):
    model, optimizer = _build(seed=2)
    manager = checkpoint.CheckpointManager(Path(root), keep_last=2)
    latest = manager.latest()
    common = manager.load(latest, model, optimizer, load_optimizer=True)
    loaded = full_named_tensors(model[0])
    manager.save(3, model, optimizer, common)
    return {
        "latest": latest.name,
        "consumed": common.consumed_samples,
        "weights": loaded,
        "after": sorted(p.name for p in Path(root).iterdir()),
    }


@pytest.mark.parametrize("crash_point", ["write", "publish", "resave"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, crash_point):
    with pytest.raises(DistributedTaskError, match="worker process died"):
        run_distributed(save_then_crash, 1, root=str(tmp_path), crash_point=crash_point)
    assert (tmp_path / "latest").read_text() == "step_00000001"
    result = run_distributed(load_latest_and_save_again, 1, root=str(tmp_path))[0]
    # A crashed re-save leaves the old step 1 set aside: loaded from there (with a warning), then restored.
    assert result["latest"] == (".old-step_00000001" if crash_point == "resave" else "step_00000001")
    assert result["consumed"] == 8
    expected = torch.load(tmp_path / "expected.pt")
    assert all(torch.equal(result["weights"][n], expected[n]) for n in expected)
    assert (tmp_path / "latest").read_text() == "step_00000003"
    assert not [n for n in result["after"] if n.startswith((".tmp-", ".old-"))], "stale saves are cleaned up"
    if crash_point == "resave":
        assert "step_00000001" in result["after"]
