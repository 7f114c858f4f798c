"""``train.init_from``: model weights only, from a checkpoint saved at any layout, into a new run at
step 0; a checkpoint of another model shape is refused before the first step."""

from pathlib import Path

import pytest

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.run import RunConfig, check_run
from megatron_ext.testing.distributed import DistributedTaskError, run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

BASE = merge(
    TINY,
    {
        "model": {"num_layers": 4},
        "train": {"micro_batch_size": 1, "steps": 6, "lr": 1.0e-2, "warmup_steps": 1},
        "checkpoint": {"save_at_end": True},
    },
)


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


def _train(run_dir, overrides):
    Trainer(from_dict(RunConfig, merge(BASE, overrides)), Path(run_dir), log=lambda line: None).run()
    return _losses(run_dir)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A short run saved at TP=2: the weights to start from."""
    run_dir = tmp_path_factory.mktemp("source")
    run_distributed(_train, 2, None, run_dir=str(run_dir), overrides={"parallel": {"tensor": 2}})
    return run_dir


def test_init_from_starts_a_new_run_from_the_weights_at_any_layout(tmp_path, source):
    one = run_distributed(
        _train, 1, None, run_dir=str(tmp_path / "one"), overrides={"train": {"init_from": str(source), "steps": 3}}
    )[0]
    pp2 = run_distributed(
        _train,
        2,
        None,
        run_dir=str(tmp_path / "pp2"),
        overrides={"train": {"init_from": str(source / "checkpoints"), "steps": 3}, "parallel": {"pipeline": 2}},
    )[0]
    fresh = run_distributed(_train, 1, None, run_dir=str(tmp_path / "fresh"), overrides={"train": {"steps": 3}})[0]
    source_losses = [loss for _, loss in _losses(source)]
    print(f"[init_from] source (TP=2) {source_losses} | from it at 1 rank {one} | at PP=2 {pp2} | fresh {fresh}")
    assert [step for step, _ in one] == [1, 2, 3]  # a new run: step 0, fresh schedule
    assert abs(one[0][1] - pp2[0][1]) <= 1e-5 * one[0][1]  # the same weights at either layout
    assert one[0][1] < fresh[0][1] - 0.1 and one[0][1] < source_losses[0] - 0.1  # trained weights, not new ones


def test_a_checkpoint_of_another_shape_is_refused_with_what_differs(tmp_path, source):
    with pytest.raises(
        DistributedTaskError,
        match=r"does not fit this model .*linear_fc2.weight: checkpoint \(4, 32, 64\), model \(4, 32, 96\)",
    ):
        run_distributed(
            _train,
            1,
            None,
            run_dir=str(tmp_path / "wide"),
            overrides={"train": {"init_from": str(source)}, "model": {"ffn_hidden_size": 96}},
        )


def test_a_path_that_is_no_checkpoint_is_a_config_error(tmp_path):
    cfg = from_dict(RunConfig, {**BASE, "train": {**BASE["train"], "init_from": str(tmp_path)}})
    with pytest.raises(ConfigError, match="train.init_from=.* is not a checkpoint of this project"):
        check_run(cfg, 1, cuda=False)
