"""configs/ernie_staged.yaml, the ERNIE-style staged recipe: the planner accepts it on 4 x 8 GPUs (and
with it every stage's checks), its schedule ramps the batch up 4x in a 100B-token WSD stage, then
trains a cosine mid-training stage on new data at 32K context with RoPE base 1e6, and the planner's
memory estimate of that longer stage fits the GPUs too."""

from megatron_ext.launch.memory import meta_parameter_inventory
from megatron_ext.launch.planner import format_plan_summary, make_plan
from megatron_ext.run import load_config
from megatron_ext.run.schedule import RunSchedule
from tests.slurm.cluster import REPO


def test_the_staged_recipe_plans_ramps_up_then_extends_the_context():
    cfg = load_config(REPO / "configs" / "ernie_staged.yaml")
    summary = format_plan_summary(make_plan(cfg, 4, 8, meta_parameter_inventory(cfg), environ={}))
    assert "ernie_staged: 4 node(s) x 8 GPU(s) = 32 ranks, 3.23B parameters" in summary, summary
    assert "batch: global 1024 = micro-batch 1 x DP 32 x 32 micro-batches per step" in summary

    schedule = RunSchedule(cfg, 32)
    pretrain, midtrain = schedule.stages
    assert schedule.global_batch(1) == 256 and schedule.global_batch(pretrain.last_step) == 1024
    assert schedule.consumed_tokens(pretrain.last_step - 1) < 100e9 <= schedule.consumed_tokens(pretrain.last_step)
    assert pretrain.config.train.lr_schedule == "wsd"
    m, d, t = midtrain.config.model, midtrain.config.data, midtrain.config.train
    assert (d.seq_length, m.rotary_base, t.lr_schedule, t.min_lr) == (32768, 1000000, "cosine", 1e-5)
    assert midtrain.last_step == cfg.train.steps and midtrain.data_start == 0  # new data from its start

    plan = make_plan(midtrain.config, 4, 8, meta_parameter_inventory(midtrain.config), environ={})
    peak = max(stage.total for stage in plan.memory) / 2**30
    assert peak < 80, f"the 32K stage needs {peak:.1f} GiB per GPU"
