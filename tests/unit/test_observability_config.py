"""The observability switches: refused early with a clear message, off by default; an MFU that
never exceeds 1; W&B's scalars are TensorBoard's."""

import importlib.util

import pytest

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.run import RunConfig, check_run
from megatron_ext.training.throughput import PeakFlops
from megatron_ext.training.wandb_logger import scalars
from tests.configs import TINY, merge


def problems(data, world_size=1, cuda=False):
    with pytest.raises(ConfigError) as info:
        check_run(from_dict(RunConfig, merge(TINY, data)), world_size, cuda=cuda)
    return info.value.problems


def test_everything_is_off_by_default():
    lg = from_dict(RunConfig, TINY).logging
    assert lg.wandb.mode == "disabled" and lg.profile.steps == 0
    assert lg.timers == 0 and lg.norm_interval == 0
    assert lg.slow_rank_threshold is None and lg.memory_snapshot_step is None


@pytest.mark.parametrize(
    "logging, problem",
    [
        ({"wandb": {"mode": "off"}}, "logging.wandb.mode='off' is not allowed: use one of 'online' | 'offline'"),
        ({"wandb": {"project": " "}}, "logging.wandb.project=' ' is empty"),
        ({"wandb": {"tags": ["a", ""]}}, "logging.wandb.tags=['a', ''] has an empty tag"),
        ({"profile": {"ranks": []}}, "logging.profile.ranks=[] profiles no rank"),
        ({"profile": {"ranks": [0, 0]}}, "logging.profile.ranks=[0, 0] lists a rank twice"),
        ({"profile": {"steps": -1}}, "logging.profile.steps=-1 must be >= 0"),
        ({"profile": {"start_step": 0}}, "logging.profile.start_step=0 must be positive"),
        ({"timers": 3}, "logging.timers=3 must be in [0, 2]"),
        ({"norm_interval": -2}, "logging.norm_interval=-2 must be >= 0"),
        ({"slow_rank_threshold": 1.0}, "logging.slow_rank_threshold=1.0 must be > 1"),
        ({"memory_snapshot_step": 0}, "logging.memory_snapshot_step=0 must be positive"),
    ],
)
def test_bad_values_are_refused_with_their_yaml_path(logging, problem):
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, merge(TINY, {"logging": logging}))
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_the_launch_checks_refuse_what_the_job_cannot_do():
    found = problems(
        {
            "train": {"steps": 4},
            "logging": {
                "log_interval": 2,
                "norm_interval": 3,
                "memory_snapshot_step": 2,
                "profile": {"start_step": 2, "steps": 1, "ranks": [0, 2]},
            },
        },
        world_size=2,
    )
    assert found == [
        "logging.profile.ranks=[0, 2] names ranks [2] of a job of 2 ranks (0 .. 1)",
        "logging.norm_interval=3 is not a multiple of logging.log_interval=2: the norms are written with the "
        "logged steps",
        "logging.memory_snapshot_step=2 records the CUDA allocator, and this run has no GPU; drop it (the CPU run "
        "logs its resident set, mem/peak_gib)",
    ]
    assert problems({"train": {"steps": 4}, "logging": {"profile": {"start_step": 5, "steps": 1}}}) == [
        "logging.profile.start_step=5 is after the last step (train.steps=4): nothing would be profiled"
    ]


def test_wandb_without_the_package_is_refused_before_any_work(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert problems({"logging": {"wandb": {"mode": "offline"}}}) == [
        "logging.wandb.mode='offline' needs the wandb package, which is not installed: pip install '.[wandb]', "
        "or set logging.wandb.mode: disabled"
    ]


def test_mfu_never_exceeds_one_and_the_log_names_the_peak_in_use():
    lines = []
    peak = PeakFlops(2e12, "measured fp32 matmul on CPU, best of 5 rounds", log=lines.append)
    assert str(peak) == "2 TFLOP/s per rank (measured fp32 matmul on CPU, best of 5 rounds)"
    assert peak.mfu(1e12) == 0.5 and lines == []
    assert peak.mfu(3e12) == 1.0  # a step beat the measured peak: it becomes the peak
    assert peak.flops == 3e12 and len(lines) == 1 and lines[0].startswith("mfu against 3 TFLOP/s per rank (raised")
    assert peak.mfu(1.5e12) == 0.5


def test_wandb_gets_the_scalars_tensorboard_gets():
    record = {"step": 3, "loss": 2.5, "norm/layer_grad": [0.1, 0.2], "flag": True, "bad": float("nan"), "n": 4}
    assert scalars(record) == {"loss": 2.5, "norm/layer_grad/0": 0.1, "norm/layer_grad/1": 0.2, "n": 4}
