"""Print, as JSON, the groups and ranks Megatron-Core's ``initialize_model_parallel`` gives every
rank of a world, built in one process on torch's "fake" backend (a process group without peers).

    python -m tests.slurm.fake_world '[[TP, PP, CP, EP, ETP, WORLD], ...]'
"""

import json
import sys

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore


def megatron_view(tp: int, pp: int, cp: int, ep: int, etp: int, world: int) -> dict:
    from megatron.core import parallel_state as ps

    result = {}
    for rank in range(world):
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        try:
            ps.initialize_model_parallel(
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                context_parallel_size=cp,
                expert_model_parallel_size=ep,
                expert_tensor_parallel_size=etp,
                create_gloo_process_groups=False,
            )
            ranks = dist.get_process_group_ranks
            result[rank] = {
                "coords": {
                    "tp": ps.get_tensor_model_parallel_rank(),
                    "pp": ps.get_pipeline_model_parallel_rank(),
                    "cp": ps.get_context_parallel_rank(),
                    "dp": ps.get_data_parallel_rank(),
                    "ep": ps.get_expert_model_parallel_rank(),
                    "etp": ps.get_expert_tensor_parallel_rank(),
                    "edp": ps.get_expert_data_parallel_rank(),
                },
                "groups": {
                    "tp": ranks(ps.get_tensor_model_parallel_group()),
                    "pp": ranks(ps.get_pipeline_model_parallel_group()),
                    "cp": ranks(ps.get_context_parallel_group()),
                    "dp": ranks(ps.get_data_parallel_group()),
                    "dp-cp": ranks(ps.get_data_parallel_group(with_context_parallel=True)),
                    "tp-pp": ranks(ps.get_model_parallel_group()),
                    "ep": ranks(ps.get_expert_model_parallel_group()),
                    "etp": ranks(ps.get_expert_tensor_parallel_group()),
                    "edp": ranks(ps.get_expert_data_parallel_group()),
                    "etp-ep": ranks(ps.get_expert_tensor_and_model_parallel_group()),
                },
            }
        finally:
            ps.destroy_model_parallel()
            dist.destroy_process_group()
    return result


if __name__ == "__main__":
    print(json.dumps([megatron_view(*layout) for layout in json.loads(sys.argv[1])]))
