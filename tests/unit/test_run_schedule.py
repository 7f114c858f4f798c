"""The run schedule (:mod:`megatron_ext.run.schedule`): the ramp-up's global batches equal
Megatron-Core's calculator step by step; stage lengths in steps or tokens, data positions in tokens,
LR schedule lengths; bad ramp-ups and stage overrides are refused naming the field."""

import re

import pytest

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.run import RunConfig, check_run
from megatron_ext.run.schedule import RunSchedule
from megatron_ext.training.capabilities import capability_callbacks
from tests.configs import TINY, merge


def _cfg(extra):
    return from_dict(RunConfig, merge(TINY, {"data": {"kind": "synthetic"}, **extra}))


@pytest.mark.parametrize(
    "ramp, gbs, mbs, dp", [([4, 4, 96], 32, 2, 2), ([2, 6, 50], 20, 1, 2), ([8, 8, 300], 64, 4, 1)]
)
def test_rampup_equals_megatron_cores_calculator_step_by_step(ramp, gbs, mbs, dp):
    from megatron.core import num_microbatches_calculator as calc

    steps = 40
    cfg = _cfg(
        {"train": {"global_batch_size": gbs, "micro_batch_size": mbs, "steps": steps, "rampup_batch_size": ramp}}
    )
    schedule = RunSchedule(cfg, dp)
    calc.destroy_num_microbatches_calculator()
    calc.init_num_microbatches_calculator(0, ramp, gbs, mbs, dp)
    consumed = 0
    try:
        for step in range(1, steps + 1):  # Megatron-LM's loop: update from the consumed samples, then train
            calc.update_num_microbatches(consumed, consistency_check=True)
            assert schedule.global_batch(step) == calc.get_current_global_batch_size()
            assert schedule.global_batch(step) // (mbs * dp) == calc.get_num_microbatches()
            consumed += calc.get_num_microbatches() * mbs * dp
            assert schedule.consumed_samples(step) == consumed
    finally:
        calc.destroy_num_microbatches_calculator()
    assert schedule.global_batch(steps) == gbs  # the ramp is over
    decay, warmup, _ = schedule.lr_lengths(schedule.stages[0])
    assert decay == consumed and warmup == 0  # with a ramp-up the LR schedule counts samples


def test_stages_in_steps_and_tokens_keep_the_data_position_in_tokens():
    cfg = _cfg(
        {
            "train": {"global_batch_size": 4, "steps": 9},
            "stages": [
                {"steps": 3},
                {"tokens": 4 * 32 * 2 + 1, "data": {"seq_length": 32}},  # 3 steps: the first to pass the count
                {"name": "new-data", "data": {"seed": 7}},
            ],
        }
    )
    s = RunSchedule(cfg, 1)
    assert [(st.first_step, st.last_step) for st in s.stages] == [(1, 3), (4, 6), (7, 9)]
    assert [st.name for st in s.stages] == ["stage0", "stage1", "new-data"]
    assert s.data_position(4) == 3 * 4 * 16 // 32  # 192 tokens of 16-token samples = 6 samples of 32
    assert s.data_position(5) == 6 + 4
    assert s.data_position(7) == 0  # other data: from its start
    assert s.consumed_tokens(6) == 3 * 4 * 16 + 3 * 4 * 32
    assert s.stage_samples(s.stages[1]) == 6 + 12
    assert s.stage_of(0).index == 0 and s.stage_of(3).index == 0 and s.stage_of(4).index == 1


def test_a_stage_with_its_own_global_batch_trains_at_it_after_the_ramp():
    cfg = _cfg(
        {
            "train": {"global_batch_size": 16, "steps": 10, "rampup_batch_size": [4, 4, 24]},
            "stages": [
                {"steps": 6},
                {"steps": 2, "train": {"global_batch_size": 4}, "data": {"seq_length": 64}},
                {"name": "same batch, next data", "data": {"seed": 3}},  # inherits the batch of 4
            ],
        }
    )
    s = RunSchedule(cfg, 1)
    assert list(s.batches) == [4, 4, 8, 12, 16, 16, 4, 4, 4, 4]
    assert s.stages[1].config.train.rampup_batch_size is None and s.stages[2].config.train.global_batch_size == 4
    assert s.consumed_tokens(8) == 60 * 16 + 8 * 64
    assert s.data_position(7) == 60 * 16 // 64  # the same data at 4x the length
    assert s.batch_varies and not RunSchedule(_cfg({"train": {"steps": 3}}), 1).batch_varies
    with pytest.raises(ConfigError, match=r"stages\[1\] \(stage1\): train.global_batch_size=5 is not divisible"):
        check_run(
            _cfg({"train": {"steps": 4}, "stages": [{"steps": 2}, {"train": {"global_batch_size": 5}}]}), 1, cuda=False
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"train": {"global_batch_size": 8, "rampup_batch_size": [8, 2, 10]}},
            "start=8 must be below global_batch_size=8",
        ),
        ({"train": {"global_batch_size": 16, "rampup_batch_size": [4, 5, 10]}}, "is not divisible by increment=5"),
        ({"train": {"rampup_batch_size": [4, 2]}}, "three positive integers"),
        ({"stages": [{"steps": 5, "model": {"hidden_size": 64}}]}, "model.hidden_size cannot change between stages"),
        (
            {"stages": [{"steps": 5, "data": {"seq_lenght": 32}}]},
            "stages[0].data.seq_lenght is not a field of the data section (did you mean 'seq_length'?)",
        ),
        ({"stages": [{"steps": 5, "tokens": 100}]}, "give the stage's length one way"),
    ],
)
def test_bad_rampup_and_stage_fields_are_refused_naming_the_field(extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg = _cfg(extra)
        RunSchedule(cfg, 1)


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (
            {"train": {"global_batch_size": 16, "rampup_batch_size": [2, 2, 10]}},
            2,
            r"rampup_batch_size=\[2, 2, 10\]: start=2 is not divisible by train.micro_batch_size x data-parallel",
        ),
        ({"train": {"steps": 10}, "stages": [{"steps": 4}, {"steps": 4}]}, 1, "set train.steps to 8"),
        (
            {"train": {"steps": 10}, "stages": [{"steps": 4}, {"train": {"warmup_steps": 6}}]},
            1,
            r"stages\[1\].train.warmup_steps=6 must be below the stage's 6 steps",
        ),
        (
            {
                "model": {"position_embedding": "learned_absolute"},
                "stages": [{"steps": 4}, {"data": {"seq_length": 32}}],
            },
            1,
            "learned absolute position embeddings have 16 rows",
        ),
        (
            {
                "stages": [
                    {"steps": 4},
                    {
                        "model": {
                            "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}
                        }
                    },
                ]
            },
            1,
            "YaRN's parameters live in the model's transformer config",
        ),
        (
            {"data": {"kind": "default"}, "stages": [{"steps": 4}, {"data": {"reset_position_ids": True}}]},
            1,
            r"stages\[1\].data.reset_position_ids=True: the model's RoPE reads per-document positions",
        ),
        (
            {"stages": [{"steps": 4}, {"data": {"seq_length": 40}, "model": {"max_position_embeddings": 32}}]},
            1,
            r"stages\[1\] \(stage1\): model.max_position_embeddings=32 is shorter than data.seq_length=40",
        ),
    ],
)
def test_schedule_problems_come_with_the_runs_checks(extra, world, message):
    with pytest.raises(ConfigError, match=message):
        check_run(_cfg(extra), world, cuda=False)


def test_consa_stage_one_in_tokens_counts_the_tokens_really_trained():
    """A ramp-up makes early steps small: ``mask_learning_tokens`` is reached after the steps whose
    real tokens add up to it, not after tokens / (global batch x sequence)."""
    cfg = _cfg(
        {
            "train": {"global_batch_size": 32, "micro_batch_size": 2, "steps": 40, "rampup_batch_size": [4, 4, 96]},
            "hybrid_attention": {
                "enabled": True,
                "method": "consa",
                "window": 4,
                "mask_learning_start_step": 3,
                "mask_learning_tokens": 1000,
            },
        }
    )
    assert not check_run(cfg, 1, cuda=False)
    callback = capability_callbacks(cfg, log=lambda line: None)["hybrid_attention"]
    schedule = RunSchedule(cfg, 1)
    tokens = [schedule.consumed_tokens(3 + n) - schedule.consumed_tokens(3) for n in range(38)]
    expected = next(n for n, t in enumerate(tokens) if t >= 1000)
    assert callback.stage_steps == expected and tokens[expected - 1] < 1000 <= tokens[expected]
    assert expected > round(1000 / (32 * 16)) + 2  # the constant conversion would end stage 1 far too early
