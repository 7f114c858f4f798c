"""Initialize and destroy Megatron's ``parallel_state`` for given parallel sizes.

The default process group must exist already (``torchrun`` + ``init_process_group``, or the test
harness). Megatron's rank order ``tp-cp-ep-dp-pp`` is used, as in Megatron-LM.
"""

from __future__ import annotations

import gc
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_ext.parallel.sizes import layout_problems


@dataclass(frozen=True)
class ParallelSizes:
    """Sizes of the parallel dimensions; data parallelism fills what is left of the world."""

    tp: int = 1
    """Tensor-model-parallel size."""
    pp: int = 1
    """Pipeline-model-parallel size."""
    cp: int = 1
    """Context-parallel size."""
    ep: int = 1
    """Expert-model-parallel size (carved out of the data-parallel ranks, as in Megatron)."""
    etp: Optional[int] = None
    """Expert-tensor-parallel size; None means equal to ``tp`` (Megatron's default)."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved 1F1B); None disables interleaving."""

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel size {name}={value!r} is invalid: use an integer >= 1.")
        for name in ("etp", "vpp"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"parallel size {name}={value!r} is invalid: use None or an integer >= 1.")

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; raises ValueError when the sizes do not fit."""
        dp, problems = layout_problems(
            world_size, tensor=self.tp, pipeline=self.pp, context=self.cp, expert=self.ep, expert_tensor=self.etp
        )
        if problems:
            raise ValueError("; ".join(problems))
        return dp


def initialize_parallel_state(sizes: ParallelSizes, seed: int = 1234, timeout_minutes: float = 10.0) -> None:
    """Create Megatron's model-parallel groups (their collectives time out after ``timeout_minutes``,
    as the world's do) and seed its RNG tracker for this rank."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_process_group first.")
    sizes.data_parallel_size(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        virtual_pipeline_model_parallel_size=sizes.vpp,
        context_parallel_size=sizes.cp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.etp,
        distributed_timeout_minutes=timeout_minutes,
        # Megatron adds gloo twins of its NCCL groups; when the backend is gloo they are duplicates.
        create_gloo_process_groups=dist.get_backend() != "gloo",
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel_state() -> None:
    """Tear down Megatron's groups and the global state that outlives a model."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from megatron_ext.compat.distributed import destroy_process_groups_but_world

    clear_aux_losses_tracker()
    destroy_num_microbatches_calculator()
    parallel_state.destroy_model_parallel()
    # Megatron forgets its groups but does not destroy them; each gloo group keeps threads and
    # sockets, so a process that sets up parallel state many times (tests) would accumulate them.
    destroy_process_groups_but_world()
    # A destroyed gloo group's threads end only when its last reference goes; the models, DDP
    # buckets and callbacks of a finished run hold theirs in reference cycles.
    gc.collect()


def comm_device() -> torch.device:
    """Device for tensors that go through collectives: the GPU under NCCL, the CPU under gloo."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(cuda: bool, timeout_minutes: float = 10) -> None:
    """Create the default process group from torchrun's environment (NCCL on GPU, gloo on CPU).

    Without torchrun's variables (a plain ``python -m ...``) this is a one-rank job.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))


@contextmanager
def parallel_job(sizes: ParallelSizes, seed: int = 1234):
    """The process group and Megatron's parallel state for the body of a command-line tool.

    CPU support is switched on where there is no GPU; everything is torn down on exit.
    """
    from megatron_ext.compat import enable_cpu_support

    enable_cpu_support()
    init_distributed(torch.cuda.is_available())
    initialize_parallel_state(sizes, seed=seed)
    try:
        yield
    finally:
        destroy_parallel_state()
        dist.destroy_process_group()


PROCESS_GROUPS = (
    "tp",
    "pp",
    "mp",
    "cp",
    "tp_cp",
    "ep",
    "expt_tp",
    "tp_ep",
    "tp_ep_pp",
    "dp",
    "dp_cp",
    "expt_dp",
    "tp_dp_cp",
)
"""The groups of :func:`process_groups`: Megatron's names (``mp`` = TP x PP, ``dp_cp`` = DP x CP, ...)."""


def process_groups():
    """Megatron's ``ProcessGroupCollection`` of this rank's groups (after :func:`initialize_parallel_state`),
    to hand to modules and callbacks explicitly instead of their reading the global parallel state."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(PROCESS_GROUPS))
