"""Batch-size ramp-up and multi-stage runs through the real training loop (one gloo rank, the tiny
model): the global batch, consumed samples and stage of every step follow the schedule; a run
stopped mid-ramp, at a stage boundary or inside the second stage and resumed gives the losses of the
uninterrupted run bit for bit; the optimizer state and weights cross the stage change unchanged; the
second stage's RoPE table is the one a model built with its settings has."""

import os
import signal
from pathlib import Path

import pytest
import torch

from megatron_ext.capability import Callback
from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

RAMP = merge(
    TINY,
    {
        "model": {"num_query_groups": None},
        "data": {"kind": "synthetic"},
        "train": {"global_batch_size": 8, "steps": 6, "warmup_steps": 1, "rampup_batch_size": [2, 2, 12]},
        "checkpoint": {"save_at_end": False},  # the stops checkpoint (SIGUSR1); no other save
    },
)
"""Global batches 2, 2, 4, 6, 8, 8 (a step of 2 samples every 4 consumed samples up to 12)."""

STAGED = merge(
    RAMP,
    {
        "train": {"steps": 7},
        "stages": [
            {"name": "pretrain", "steps": 4, "train": {"lr_schedule": "wsd", "wsd_decay_steps": 1}},
            {
                "name": "midtrain",
                "data": {"seq_length": 32},
                "model": {"rotary_base": 1000000},
                "train": {"lr": 1.0e-3, "min_lr": 1.0e-5, "warmup_steps": 0, "lr_schedule": "cosine"},
            },
        ],
    },
)
"""A WSD stage of 4 steps, then a cosine stage at twice the sequence length and RoPE base 1e6."""


def _adam_state(optimizer) -> torch.Tensor:
    """Every exp_avg of ``optimizer`` (Megatron's wrapper of a torch optimizer), flattened."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return torch.cat([s["exp_avg"].flatten().clone() for s in inner.state.values() if "exp_avg" in s])


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for chunk in model for p in chunk.parameters()])


class _Probe(Callback):
    """Records the optimizer state and weights at the end of ``step`` and at the start of the next, the
    RoPE frequencies there; asks the run to stop (SIGUSR1: checkpoint and exit) after ``stop_after``."""

    name = "probe"

    def __init__(self, step=None, stop_after=None):
        self.step, self.stop_after, self.seen = step, stop_after, {}

    def on_step_end(self, ctx, result):
        if ctx.step == self.step:
            self.seen["end"] = (_adam_state(ctx.optimizer), _weights(ctx.model))
        if ctx.step == self.stop_after:
            os.kill(os.getpid(), signal.SIGUSR1)
        return {}

    def on_step_begin(self, ctx):
        if self.step is not None and ctx.step == self.step:
            self.seen["begin"] = (_adam_state(ctx.optimizer), _weights(ctx.model))
            self.seen["inv_freq"] = ctx.model[0].module.rotary_pos_emb.inv_freq.clone()


def _train(run_dir, config, **probe):
    from megatron_ext.training.loop import Trainer

    lines, cb = [], _Probe(**probe)
    summary = Trainer(from_dict(RunConfig, config), Path(run_dir), callbacks=[cb], log=lines.append).run()
    return summary.losses, lines, cb.seen


def straight_and_resumed(run_dir, config, stops):
    reference, lines, _ = _train(Path(run_dir) / "straight", config)
    resumed = {}
    for stop in stops:
        where = Path(run_dir) / f"stop{stop}"
        _train(where, config, stop_after=stop)
        resumed[stop] = _train(where, config)[0]
    return reference, lines, resumed, read_metrics(Path(run_dir) / "straight" / "metrics.jsonl")


def test_rampup_follows_the_schedule_and_resumes_mid_ramp_bitwise(tmp_path):
    from megatron_ext.run.schedule import RunSchedule

    reference, lines, resumed, records = run_distributed(
        straight_and_resumed, 1, None, run_dir=str(tmp_path), config=RAMP, stops=[3]
    )[0]
    schedule = RunSchedule(from_dict(RunConfig, RAMP), 1)
    assert [r["global_batch_size"] for r in records] == [2, 2, 4, 6, 8, 8] == list(schedule.batches)
    assert [r["consumed_samples"] for r in records] == [2, 4, 8, 14, 22, 30]
    assert [r["consumed_tokens"] for r in records] == [16 * r["consumed_samples"] for r in records]
    assert resumed[3] == reference[3:], "steps 4..6 after a stop at step 3 (mid-ramp) must repeat bit for bit"
    assert any("| batch 4 |" in line for line in lines)


def staged_run(run_dir):
    return _train(Path(run_dir), merge(STAGED, {"checkpoint": {"save_interval": 4, "save_at_end": True}}), step=4)


def load_as_the_tools_do(run_dir):
    """What evaluate, generate, export and extract build from the checkpoints of steps 4 and 7."""
    from megatron_ext.evaluation.model import EvalModel
    from megatron_ext.run.schedule import trained_config

    loaded = {step: EvalModel.load(run_dir, step) for step in (4, 7)}
    rope = {step: m.model.rotary_pos_emb.inv_freq.clone() for step, m in loaded.items()}
    lengths = {step: m.max_length for step, m in loaded.items()}
    return rope, lengths, trained_config(run_dir, overrides=["data.seq_length=64"]).data.seq_length


def test_a_stage_change_keeps_the_optimizer_state_and_weights_and_sets_the_new_rope(tmp_path):
    from megatron_ext.parallel import ParallelSizes

    losses, lines, seen = run_distributed(staged_run, 1, None, run_dir=str(tmp_path))[0]
    rope, lengths, override = run_distributed(load_as_the_tools_do, 1, ParallelSizes(), run_dir=str(tmp_path))[0]
    (adam_end, weights_end), (adam_begin, weights_begin) = seen["end"], seen["begin"]
    assert adam_end.abs().sum() > 0
    assert torch.equal(adam_end, adam_begin) and torch.equal(weights_end, weights_begin)
    dim = 2 * seen["inv_freq"].numel()
    expected = 1.0 / (1000000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    assert torch.equal(seen["inv_freq"], expected)
    # The step-7 checkpoint (stage 2) loads with its stage's RoPE base and length, step 4's with the run's.
    assert torch.equal(rope[7], expected) and not torch.equal(rope[4], expected)
    assert torch.equal(rope[4], 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    assert lengths == {4: 16, 7: 32} and override == 64
    change = [line for line in lines if "begins at step" in line]
    assert len(change) == 1 and "stage 1 (midtrain) begins at step 5" in change[0] and "seq_length 32" in change[0]
    records = read_metrics(Path(tmp_path) / "metrics.jsonl")
    assert [r["stage"] for r in records] == [0, 0, 0, 0, 1, 1, 1]
    # The second stage reads the sample stream from the tokens the first one trained (14 samples of 16).
    assert [r["consumed_tokens"] for r in records][3:5] == [14 * 16, 14 * 16 + 8 * 32]
    # Its own schedule, in samples (a ramp-up run): cosine from 1e-3 to 1e-5 over its 3 x 8 samples; the
    # record's lr is the one set after the step, a third of the way.
    assert records[4]["lr"] == pytest.approx(1.0e-5 + 0.75 * (1.0e-3 - 1.0e-5))


def test_resume_at_and_after_a_stage_boundary_is_bitwise(tmp_path):
    reference, _, resumed, records = run_distributed(
        straight_and_resumed, 1, None, run_dir=str(tmp_path), config=STAGED, stops=[4, 5]
    )[0]
    assert resumed[4] == reference[4:], "a stop at the last step of stage 0 must resume into stage 1 bit for bit"
    assert resumed[5] == reference[5:], "a stop inside stage 1 must resume bit for bit"


MOE_STAGED = merge(
    TINY,
    {
        "model": {"num_layers": 3},
        "data": {"kind": "synthetic"},
        "train": {"steps": 6, "warmup_steps": 1},
        "checkpoint": {"save_at_end": False},
        "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 16},
        "routing": {"expert_bias": True, "bias_update_rate": 0.01},
        "elastic": {"enabled": True, "depth_full_prob": 0.0, "width_full_prob": 0.0, "topk_default_prob": 0.0},
        "stages": [
            {"name": "elastic", "steps": 3},
            {
                "name": "full",
                "routing": {"bias_update_rate": 0.1},
                "elastic": {"depth_full_prob": 1.0, "width_full_prob": 1.0, "topk_default_prob": 1.0},
            },
        ],
    },
)
"""Every step of the first stage a reduced sub-network, the full network in the second; the expert
bias moves by 0.01 per step in the first stage and by 0.1 in the second."""


class _BiasProbe(Callback):
    """The largest change of any expert bias over each step."""

    name = "bias_probe"

    def __init__(self):
        self.before, self.moved = None, {}

    def _biases(self, ctx):
        from megatron_ext.moe.router import elastic_routers

        return torch.cat([r.expert_bias.detach().clone() for r in elastic_routers(ctx.model)])

    def on_step_begin(self, ctx):
        self.before = self._biases(ctx)

    def on_step_end(self, ctx, result):
        self.moved[ctx.step] = float((self._biases(ctx) - self.before).abs().max())
        return {}


def _moe_staged(run_dir):
    from megatron_ext.training.loop import Trainer

    probe = _BiasProbe()
    Trainer(from_dict(RunConfig, MOE_STAGED), Path(run_dir), callbacks=[probe], log=lambda line: None).run()
    return probe.moved, read_metrics(Path(run_dir) / "metrics.jsonl")


def test_a_stage_changes_the_bias_update_rate_and_the_elastic_sampling(tmp_path):
    moved, records = run_distributed(_moe_staged, 1, None, run_dir=str(tmp_path))[0]
    assert [moved[step] for step in range(1, 7)] == pytest.approx([0.01] * 3 + [0.1] * 3)
    full = [(r["elastic/depth"], r["elastic/num_experts"], r["elastic/topk"]) == (3, 4, 2) for r in records]
    assert full == [False] * 3 + [True] * 3, records


def test_stage_overrides_of_capability_sections_are_checked_before_any_work():
    from megatron_ext.config import ConfigError
    from megatron_ext.run.checks import check_run

    with pytest.raises(ConfigError, match=r"stages\[1\].routing.mode cannot change between stages"):
        from_dict(RunConfig, merge(MOE_STAGED, {"stages": [{"steps": 3}, {"routing": {"mode": "isolated"}}]}))
    no_bias = from_dict(RunConfig, merge(MOE_STAGED, {"routing": {"expert_bias": False}}))
    no_elastic = from_dict(RunConfig, merge(MOE_STAGED, {"elastic": {"enabled": False}}))
    with pytest.raises(ConfigError, match=r"stages\[1\].routing sets bias_update_rate, but the run has no expert bias"):
        check_run(no_bias, 1, cuda=False)
    with pytest.raises(ConfigError, match=r"stages\[1\].elastic sets depth_full_prob, topk_default_prob, width_full"):
        check_run(no_elastic, 1, cuda=False)


def _moe_ramp(run_dir):
    from megatron_ext.training.loop import Trainer

    config = merge(
        RAMP,
        {
            "moe": {
                "enabled": True,
                "num_experts": 4,
                "top_k": 2,
                "expert_ffn_hidden_size": 16,
                "load_balancing": "aux_loss",
                "aux_loss_coeff": 1.0e-2,
            },
            "routing": {"expert_bias": False},
        },
    )
    Trainer(from_dict(RunConfig, config), Path(run_dir), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def test_router_losses_are_averaged_over_the_micro_batches_of_each_step_of_a_ramp(tmp_path):
    records = run_distributed(_moe_ramp, 1, None, run_dir=str(tmp_path))[0]
    assert [r["global_batch_size"] for r in records] == [2, 2, 4, 6, 8, 8]  # 1, 1, 2, 3, 4, 4 micro-batches
    # The switch loss without its coefficient is about 1 near balance at any batch; a sum over the
    # micro-batches divided by a fixed count would scale with the step's micro-batches.
    losses = [r["moe/load_balancing_loss"] for r in records]
    assert all(0.8 < loss < 1.6 for loss in losses), losses
