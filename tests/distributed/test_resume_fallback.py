"""Resume when ``latest`` cannot be trusted: missing, naming another run's checkpoint, or naming a
checkpoint that does not verify (its manifest deleted); every case resumes from the newest checkpoint
of this run that verifies, says so, and keeps the metrics history (later records moved aside). A
crafted ``common.pt`` is refused in one message naming the file; a run asked to end before its
checkpoint's step says so; a save that fails (a full disk) is one message, and the previous checkpoint
stays the latest."""

import errno
import os
import pickle
from pathlib import Path

import pytest

from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.rundir import read_metrics
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


def _train(run_dir, steps):
    from megatron_ext.training.loop import Trainer

    lines = []
    cfg = from_dict(RunConfig, {**CONFIG, "train": {**CONFIG["train"], "steps": steps}})
    summary = Trainer(cfg, Path(run_dir), log=lines.append).run()
    return summary.losses, lines


def _steps(run_dir: Path):
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]


def untrusted_latest(run_dir, case):
    root = Path(run_dir)
    # The LR schedule spans train.steps: the reference stops at step 4 as the run does, unless the run
    # falls back to step 2 (steps 1 and 2 do not depend on the schedule's length).
    if case == "no_manifest":
        reference, _ = _train(root / "straight", 6)
    else:
        reference, _ = _train(root / "straight", 4)
        reference += _train(root / "straight", 6)[0]
    run = root / "run"
    _train(run, 4)  # checkpoints at 2 and 4; latest names step 4
    checkpoints = run / "checkpoints"
    if case == "missing":
        (checkpoints / "latest").unlink()
    elif case == "elsewhere":  # an absolute path to another run's checkpoint
        _train(root / "other", 2)
        (checkpoints / "latest").write_text(str(root / "other" / "checkpoints" / "step_00000002"))
    elif case == "no_manifest":  # step 4 damaged and its manifest gone: unverified, back to step 2
        (checkpoints / "step_00000004" / "manifest.json").unlink()
        distcp = sorted((checkpoints / "step_00000004").glob("*.distcp"))[0]
        distcp.write_bytes(distcp.read_bytes()[:100])
    losses, lines = _train(run, 6)
    aside = sorted(p.name for p in run.glob("metrics.after_step_*.jsonl"))
    aside_steps = [r["step"] for p in aside for r in read_metrics(run / p)]
    return reference, losses, lines, _steps(run), aside, aside_steps


@pytest.mark.parametrize("case", ["missing", "elsewhere", "no_manifest"])
def test_resume_from_the_newest_verified_checkpoint_of_this_run(case, tmp_path):
    reference, losses, lines, steps, aside, aside_steps = run_distributed(
        untrusted_latest, 1, None, run_dir=str(tmp_path), case=case
    )[0]
    print(f"[fallback] {case}: {[line for line in lines if 'latest' in line or 'damaged' in line or 'moved' in line]}")
    resumed_at = 2 if case == "no_manifest" else 4
    assert any(f"at step {resumed_at}" in line and line.startswith("resumed from") for line in lines), lines
    assert str(tmp_path / "other") not in "".join(line for line in lines if line.startswith("resumed from"))
    assert losses == reference[resumed_at:], "the same losses as a run never interrupted"
    assert steps == [1, 2, 3, 4, 5, 6], "the metrics history is kept"
    if case == "no_manifest":
        notes = [line for line in lines if "is damaged" in line]
        assert len(notes) == 1 and "manifest.json is missing" in notes[0], lines
        assert aside == ["metrics.after_step_00000002.jsonl"] and aside_steps == [3, 4], (aside, aside_steps)
        assert any("moved 2 metrics record(s) past step 2" in line for line in lines), lines
    else:
        assert any("latest" in line and "step_00000004" in line for line in lines if "warning" in line), lines
        assert aside == []


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_common(run_dir, marker):
    from megatron_ext.training.checkpoint import CheckpointError, write_manifest

    _train(run_dir, 2)
    step = Path(run_dir) / "checkpoints" / "step_00000002"
    with open(step / "common.pt", "wb") as f:
        pickle.dump({"common": Payload(marker)}, f)
    write_manifest(step)  # the forger makes the manifest agree
    with pytest.raises(CheckpointError) as err:
        _train(run_dir, 4)
    return str(err.value)


def test_a_crafted_common_state_is_one_message_naming_the_file(tmp_path):
    marker = tmp_path / "owned"
    message = run_distributed(crafted_common, 1, None, run_dir=str(tmp_path / "run"), marker=str(marker))[0]
    print(f"[crafted] {message}")
    assert "common.pt" in message and "refusing" in message and "Traceback" not in message, message
    assert not marker.exists()


def steps_below_checkpoint(run_dir):
    from megatron_ext.config import ConfigError

    _train(run_dir, 4)
    with pytest.raises(ConfigError) as err:
        _train(run_dir, 2)
    return str(err.value), sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


def test_a_run_asked_to_end_before_its_checkpoint_says_so(tmp_path):
    message, after = run_distributed(steps_below_checkpoint, 1, None, run_dir=str(tmp_path / "run"))[0]
    assert "train.steps=2" in message and "step 4" in message, message
    assert "step_00000004" in after and "latest" in after


def disk_full_during_save(run_dir):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_ext.training.checkpoint import CheckpointError

    _train(run_dir, 2)
    original = filesystem_async._write_item

    def no_space(*args, **kwargs):  # in the writer processes the save forks
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    filesystem_async._write_item = no_space
    try:
        with pytest.raises(CheckpointError) as err:
            _train(run_dir, 4)
    finally:
        filesystem_async._write_item = original
    checkpoints = Path(run_dir) / "checkpoints"
    return str(err.value), (checkpoints / "latest").read_text(), sorted(p.name for p in checkpoints.iterdir())


def test_a_full_disk_during_a_save_is_one_message_and_keeps_the_last_checkpoint(tmp_path):
    message, latest, entries = run_distributed(disk_full_during_save, 1, None, run_dir=str(tmp_path / "run"))[0]
    print(f"[full disk] {message}")
    assert "saving checkpoint step_00000004 failed" in message and "No space left on device" in message, message
    assert "Traceback" not in message
    assert latest == "step_00000002" and entries == ["latest", "step_00000002"], entries
