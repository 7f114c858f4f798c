"""The window cost ConSA measures when mask learning starts from trained weights.

At the end of a dense warm-up the callback evaluates the model twice, every unit on full attention
and every unit on SWA (``consa/window_cost`` is the difference). Checked at TP = 2 with sequence
parallelism and every other capability on (elastic MoE sub-networks, expert bias, SGT loops):

* the full-attention loss is the periodic evaluation's of the same step, bit for bit: the same
  batches through the full network, not the step's sampled sub-network;
* measuring perturbs nothing: every other figure of every step equals a run that does not measure;
* the value survives a preemption: a resumed run reports the straight run's at binarization.
"""

import copy
import json
from pathlib import Path

from megatron_ext.config import from_dict
from megatron_ext.consa.callback import ConSACallback
from megatron_ext.run import RunConfig
from megatron_ext.testing.callbacks import PreemptAfter
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.configs import EVERY_CAPABILITY, merge

WARM_UP = 6
MEASURED = ("consa/val_loss_full_attention", "consa/val_loss_all_swa", "consa/window_cost")
# The golden cases' tiny model and capabilities (tests/golden/cases.py), with this test's schedule.
CONFIG = merge(
    EVERY_CAPABILITY,
    {
        "name": "golden",
        "parallel": {"tensor": 2, "sequence_parallel": True},
        "train": {"eval_interval": WARM_UP},
        "hybrid_attention": {"mask_learning_start_step": WARM_UP, "mask_learning_steps": 4, "target_warmup_steps": 2},
        "looping": {"first_selection_step": 3, "window": 2, "max_selected_layers": 2},
        "logging": {"log_interval": 1, "tensorboard": False},
        "checkpoint": {"save_interval": 0, "save_at_end": True},
    },
)


def train(run_dir, measure=True, preempt_after=None):
    original = ConSACallback._starts_from_trained_weights
    if not measure:  # this worker process only, restored below
        ConSACallback._starts_from_trained_weights = lambda self, ctx: False
    try:
        callbacks = [PreemptAfter(preempt_after)] if preempt_after else []
        Trainer(
            from_dict(RunConfig, copy.deepcopy(CONFIG)), Path(run_dir), callbacks=callbacks, log=lambda line: None
        ).run()
    finally:
        ConSACallback._starts_from_trained_weights = original
    allocation = Path(run_dir) / "allocation.json"
    return {
        "metrics": read_metrics(Path(run_dir) / "metrics.jsonl"),
        "diagnostics": json.loads(allocation.read_text())["diagnostics"] if allocation.exists() else None,
    }


def test_window_cost_is_the_full_networks_perturbs_nothing_and_survives_a_preemption(tmp_path):
    measured = run_distributed(train, 2, None, run_dir=str(tmp_path / "measured"))[0]
    plain = run_distributed(train, 2, None, run_dir=str(tmp_path / "plain"), measure=False)[0]
    by_step = {r["step"]: r for r in measured["metrics"]}
    first = by_step[WARM_UP + 1]
    assert by_step[WARM_UP]["consa/stage"] == 0 and first["consa/stage"] == 1
    assert first["consa/val_loss_full_attention"] == by_step[WARM_UP]["val/loss"]
    assert first["consa/val_loss_all_swa"] != first["consa/val_loss_full_attention"]  # W = 8 < 32 keys
    assert first["consa/window_cost"] == first["consa/val_loss_all_swa"] - first["consa/val_loss_full_attention"]
    for step, record in by_step.items():  # reported from its measurement on
        assert [record.get(k) for k in MEASURED] == ([first[k] for k in MEASURED] if step > WARM_UP else [None] * 3)
    assert measured["diagnostics"]["window_cost"] == first["consa/window_cost"]
    assert plain["diagnostics"]["window_cost"] is None
    assert len(measured["metrics"]) == len(plain["metrics"]) == CONFIG["train"]["steps"]
    volatile = {"tokens_per_sec", "mem/peak_gib", "tflops_per_rank", "mfu", *MEASURED}
    for a, b in zip(measured["metrics"], plain["metrics"]):
        assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}

    # preempted after the measurement: the resumed run reports it at binarization as the straight run did
    run_distributed(train, 2, None, run_dir=str(tmp_path / "resumed"), preempt_after=WARM_UP + 2)
    resumed = run_distributed(train, 2, None, run_dir=str(tmp_path / "resumed"))[0]
    assert resumed["diagnostics"] == measured["diagnostics"]
