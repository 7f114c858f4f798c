"""Non-finite losses: updates are skipped and counted; the run stops after M in a row."""

import math
from pathlib import Path

import pytest
import torch

from megatron_ext.capability import Callback
from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import DistributedTaskError, run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge


class PoisonWeights(Callback):
    """Sets one weight to NaN before the given steps (then restores it)."""

    name = "poison"

    def __init__(self, steps, attention=False):
        self.steps = set(steps)
        self.saved = None
        self.attention = attention

    def on_step_begin(self, ctx):
        decoder = ctx.model[0].module.decoder
        # the final norm touches every token; the first layer's input norm every attention row too
        weight = decoder.layers[0].input_layernorm.weight if self.attention else decoder.final_layernorm.weight
        with torch.no_grad():
            if self.saved is not None:
                weight.copy_(self.saved)
                self.saved = None
            if ctx.step + 1 in self.steps:
                self.saved = weight.detach().clone()
                weight.view(-1)[0] = float("nan")


def train_with_poison(run_dir, poison_steps, steps, looping=False):
    data = merge(TINY, {"model": {"num_query_groups": None}, "train": {"steps": steps, "max_consecutive_nonfinite": 3}})
    if looping:  # entropy is measured every step; the poisoned steps' is NaN
        data["looping"] = {
            "enabled": True,
            "first_selection_step": 5,
            "window": 2,
            "top_k_layers": 1,
            "max_selected_layers": 1,
            "exclude_layers": [],
        }
    Trainer(
        from_dict(RunConfig, data),
        Path(run_dir),
        callbacks=[PoisonWeights(poison_steps, attention=looping)],
        log=lambda line: None,
    ).run()


def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path):
    run_distributed(train_with_poison, 1, None, run_dir=str(tmp_path), poison_steps=[3, 4], steps=6)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert all(math.isfinite(float(r["loss"])) for r in records if r["step"] not in (3, 4))
    assert records[-1]["loss"] < records[0]["loss"], "training continued with finite weights"


def test_a_nonfinite_step_leaves_the_sgt_entropy_untouched(tmp_path):
    run_distributed(train_with_poison, 1, None, run_dir=str(tmp_path), poison_steps=[3], steps=6, looping=True)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["sgt/entropy/0"] == records[1]["sgt/entropy/0"]  # step 3 observed nothing
    assert all(math.isfinite(r["sgt/entropy/0"]) for r in records[:4])
    assert records[-1]["sgt/looped_layers"] == 1  # the schedule went on: selected at step 5


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    with pytest.raises(DistributedTaskError, match="3 consecutive steps \\(up to step 4\\) had a non-finite"):
        run_distributed(train_with_poison, 1, None, run_dir=str(tmp_path), poison_steps=[2, 3, 4], steps=8)
    assert not (tmp_path / "checkpoints" / "latest").exists(), "no checkpoint of a diverged run"
