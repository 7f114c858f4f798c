"""configs/ernie_staged.yaml, the ERNIE-style staged recipe: the planner accepts it on 4 x 8 GPUs (and
with it every stage's checks), its schedule ramps the batch up 4x in a 100B-token WSD stage, then
trains a cosine mid-training stage on new data at 32K context with RoPE base 1e6, a lower expert-bias
rate and fewer samples a step, then a 128K stage on the same data; the planner's memory estimate is
that of the 128K stage, and fits the GPUs."""

from megatron_ext.launch.memory import meta_parameter_inventory
from megatron_ext.launch.planner import format_plan_summary, make_plan
from megatron_ext.run import load_config
from megatron_ext.run.schedule import RunSchedule
from tests.slurm.cluster import REPO


def test_the_staged_recipe_plans_ramps_up_then_extends_the_context():
    cfg = load_config(REPO / "configs" / "ernie_staged.yaml")
    summary = format_plan_summary(make_plan(cfg, 4, 8, meta_parameter_inventory(cfg), environ={}))
    assert "ernie_staged: 4 node(s) x 8 GPU(s) = 32 ranks, 3.23B parameters" in summary, summary
    assert "batch: global 1024 = micro-batch 1 x DP 8 x 128 micro-batches per step" in summary

    assert "peak: stage 0 in the run's stages[2] midtrain_128k (seq_length 131072)" in summary, summary
    peak = max(stage.total for stage in make_plan(cfg, 4, 8, meta_parameter_inventory(cfg), environ={}).memory)
    assert peak / 2**30 < 80, f"the 128K stage needs {peak / 2**30:.1f} GiB per GPU"

    schedule = RunSchedule(cfg, 8)  # data-parallel ranks: 32 / CP 4
    pretrain, mid32, mid128 = schedule.stages
    assert schedule.global_batch(1) == 256 and schedule.global_batch(pretrain.last_step) == 1024
    assert schedule.consumed_tokens(pretrain.last_step - 1) < 100e9 <= schedule.consumed_tokens(pretrain.last_step)
    assert pretrain.config.train.lr_schedule == "wsd" and pretrain.config.routing.bias_update_rate == 1e-4
    m, d, t = mid32.config.model, mid32.config.data, mid32.config.train
    assert (d.seq_length, m.rotary_base, t.lr_schedule, t.min_lr) == (32768, 1000000, "cosine", 1e-5)
    assert mid32.config.routing.bias_update_rate == 1e-5 and mid32.data_start == 0  # new data from its start
    assert schedule.global_batch(mid32.first_step) * d.seq_length == 1024 * 8192  # the same tokens a step
    assert (mid128.config.data.seq_length, schedule.global_batch(mid128.last_step)) == (131072, 64)
    assert mid128.last_step == cfg.train.steps and mid128.data_start == 1000 * 256 * 32768 // 131072
