"""The gloo worker pool: errors come back with the failing rank's traceback, hangs time out."""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext.parallel import ParallelSizes
from megatron_ext.testing.distributed import DistributedTaskError, DistributedTaskTimeout, run_distributed


def report_layout():
    return {
        "rank": dist.get_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "dp_size": parallel_state.get_data_parallel_world_size(),
        "sum": _all_reduce_rank(),
    }


def _all_reduce_rank():
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    return float(value)


def fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank one")
    return "fine"


def rank_zero_waits_forever():
    if dist.get_rank() == 0:
        dist.barrier()  # rank 1 never joins
    return "done"


def test_parallel_state_is_set_up_per_task():
    tp = run_distributed(report_layout, 2, ParallelSizes(tp=2))
    assert [r["tp_rank"] for r in tp] == [0, 1] and tp[0]["dp_size"] == 1
    pp = run_distributed(report_layout, 2, ParallelSizes(pp=2))
    assert [r["pp_rank"] for r in pp] == [0, 1] and [r["tp_rank"] for r in pp] == [0, 0]
    assert all(r["sum"] == 3.0 for r in pp)


def test_failing_rank_traceback_is_reported_and_pool_recovers():
    with pytest.raises(DistributedTaskError) as info:
        run_distributed(fail_on_rank_one, 2)
    message = str(info.value)
    assert "rank 1 raised" in message
    assert "deliberate failure on rank one" in message and "fail_on_rank_one" in message
    assert "rank 0 raised" not in message
    assert run_distributed(report_layout, 2)[1]["rank"] == 1  # a fresh pool works


def test_hanging_task_times_out_and_pool_recovers():
    with pytest.raises(DistributedTaskTimeout, match="stuck in a collective"):
        run_distributed(rank_zero_waits_forever, 2, timeout=5)
    assert run_distributed(report_layout, 2)[0]["sum"] == 3.0


def test_sizes_that_do_not_fit_fail_before_spawning():
    with pytest.raises(ValueError, match="not divisible by parallel.tensor \\* parallel.pipeline"):
        run_distributed(report_layout, 2, ParallelSizes(tp=4))
