"""Destroy the process groups that Megatron-Core's ``destroy_model_parallel`` leaves alive.

Written for megatron-core 0.16.1, whose ``parallel_state.destroy_model_parallel`` sets its group
globals to None without destroying the groups. Each gloo group keeps threads and sockets, so a
process that sets up parallel state many times (the test workers, which are reused across tests)
would accumulate them. torch has no public list of a process's groups; its registry is the
private ``distributed_c10d._world.pg_map`` (keyed by group, the default group among them as
``GroupMember.WORLD``), checked on first use like the Megatron internals
(:mod:`megatron_ext.compat.internals`).
"""

from __future__ import annotations

from megatron_ext.compat.internals import Internal, require

_C10D = "torch.distributed.distributed_c10d"

INTERNALS = (
    Internal(_C10D, "_world.pg_map"),
    Internal(_C10D, "GroupMember.WORLD"),
    Internal("megatron.core.parallel_state", "destroy_model_parallel"),
)
"""Every internal this module relies on."""


def destroy_process_groups_but_world() -> None:
    """Destroy every process group of this process except the default one."""
    require("megatron_ext.compat.distributed.destroy_process_groups_but_world", INTERNALS)
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    for group in list(distributed_c10d._world.pg_map):
        if group is not distributed_c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)
