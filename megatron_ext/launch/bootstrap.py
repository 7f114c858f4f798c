"""Fill torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for jobs
whose ranks were started by srun or mpirun instead of torchrun, before any process group exists.

    torchrun   the variables are there already (torchrun's workers); nothing to do
    slurm      one rank per srun task: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the rendezvous
               host is the first node of the step (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST),
               the port MASTER_PORT or one derived from the job id
    mpi        one rank per MPI process (mpirun, srun --mpi=pmix): rank, size and node-local rank
               from mpi4py; rank 0's hostname and a free port on it are broadcast over MPI
    auto       torchrun if RANK is set, else mpi if OMPI_COMM_WORLD_RANK / PMI_RANK / PMIX_RANK is
               set, else slurm inside an srun step (SLURM_PROCID and SLURM_STEP_ID), else a
               single process (nothing to fill: ``init_distributed`` makes a one-rank job)

MPI is checked before SLURM because processes that mpirun starts inside a SLURM job inherit the
SLURM variables of the daemon that spawned them, not their own. MASTER_ADDR / MASTER_PORT already
in the environment are kept (an explicit choice wins).

Then :func:`wait_for_rendezvous` makes every rank but 0 wait, with a deadline, until rank 0's
rendezvous port accepts connections, so an unreachable master fails with a message naming
MASTER_ADDR:MASTER_PORT instead of hanging in ``init_process_group``.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import MutableMapping, Optional

LAUNCHERS = ("auto", "torchrun", "slurm", "mpi")
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


class LaunchError(RuntimeError):
    """The launch environment is missing or inconsistent, or the rendezvous is unreachable."""


@dataclass(frozen=True)
class LaunchInfo:
    """What the bootstrap found (and wrote into the environment)."""

    launcher: str
    """torchrun, slurm, mpi, or single (a plain one-process run)."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]
    master_port: Optional[int]


def detect_launcher(environ: MutableMapping[str, str]) -> str:
    """Which launcher started this process (the ``auto`` rule of the module docstring)."""
    if "RANK" in environ:
        return "torchrun"
    if any(name in environ for name in MPI_RANK_VARS):
        return "mpi"
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return "slurm"
    return "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist expression ("gpu[003-005,9],cpu1" -> "gpu003"), as
    ``scontrol show hostnames "$nodelist" | head -n1`` prints it."""
    host, depth = [], 0
    for char in nodelist.strip():
        if char == "," and depth == 0:
            break
        if char == "[":
            depth += 1
            host.append(char)
        elif char == "]":
            depth -= 1
            host.append(char)
        else:
            host.append(char)
    text, result = "".join(host), []
    while "[" in text:
        prefix, rest = text.split("[", 1)
        ranges, text = rest.split("]", 1)
        first = ranges.split(",", 1)[0].split("-", 1)[0]
        result += [prefix, first]
    result.append(text)
    name = "".join(result)
    if not name:
        raise LaunchError(f"cannot read a host name from the SLURM node list {nodelist!r}")
    return name


def _int_var(environ, name: str, why: str) -> int:
    value = environ.get(name)
    if value is None or not value.strip().isdigit():
        raise LaunchError(f"{name}={value!r} is missing or not a number; {why}")
    return int(value)


def _slurm(environ: MutableMapping[str, str]) -> LaunchInfo:
    why = "--launcher slurm needs one srun task per rank (srun python -m pretrain.train --launcher slurm ...)"
    if "SLURM_STEP_ID" not in environ:
        raise LaunchError(
            "--launcher slurm: this process is not inside an srun job step (SLURM_STEP_ID is "
            "unset, e.g. it is the batch script itself); start the ranks with srun"
        )
    rank = _int_var(environ, "SLURM_PROCID", why)
    world = _int_var(environ, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS", why)
    local_rank = _int_var(environ, "SLURM_LOCALID", why)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    addr = environ.get("MASTER_ADDR")
    if not addr:
        if not nodelist:
            raise LaunchError("--launcher slurm: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
        addr = first_host(nodelist)
    if environ.get("MASTER_PORT"):
        port = _int_var(environ, "MASTER_PORT", "set it to a free TCP port number or unset it")
    else:
        # Derived from the job id, so that every task agrees on it without talking first, and two
        # jobs sharing a node are unlikely to collide.
        port = 20000 + _int_var(environ, "SLURM_JOB_ID", why) % 20000
    return LaunchInfo("slurm", rank, world, local_rank, addr, port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi(environ: MutableMapping[str, str]) -> LaunchInfo:
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise LaunchError(
            f"--launcher mpi needs mpi4py ({err}): pip install .[mpi] "
            "(it needs an MPI library such as Open MPI: apt-get install openmpi-bin)"
        ) from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank = node_comm.Get_rank()
    node_comm.Free()
    endpoint, problem = None, None
    if rank == 0:
        try:
            port = (
                _int_var(environ, "MASTER_PORT", "set it to a free TCP port number or unset it")
                if environ.get("MASTER_PORT")
                else _free_port()
            )
            endpoint = (environ.get("MASTER_ADDR") or socket.gethostname(), port)
        except LaunchError as err:
            problem = str(err)
    # Every rank learns rank 0's endpoint, or its error (so that no rank waits for a bcast forever).
    endpoint, problem = comm.bcast((endpoint, problem), root=0)
    if problem:
        raise LaunchError(f"--launcher mpi, rank 0: {problem}")
    return LaunchInfo("mpi", rank, world, local_rank, *endpoint)


def bootstrap_environment(launcher: str = "auto", environ: Optional[MutableMapping[str, str]] = None) -> LaunchInfo:
    """Resolve ``launcher`` and write RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
    into ``environ`` (default ``os.environ``) for the slurm and mpi launchers."""
    environ = os.environ if environ is None else environ
    if launcher not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
    resolved = detect_launcher(environ) if launcher == "auto" else launcher
    if resolved == "single":
        return LaunchInfo("single", 0, 1, 0, None, None)
    if resolved == "torchrun":
        missing = [n for n in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if n not in environ]
        if missing:
            raise LaunchError(
                f"--launcher torchrun but {', '.join(missing)} not set: start the job with "
                "torchrun, or pick --launcher slurm / mpi"
            )
        return LaunchInfo(
            "torchrun",
            int(environ["RANK"]),
            int(environ["WORLD_SIZE"]),
            int(environ.get("LOCAL_RANK", "0")),
            environ["MASTER_ADDR"],
            int(environ["MASTER_PORT"]),
        )
    info = _slurm(environ) if resolved == "slurm" else _mpi(environ)
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"{resolved}: rank {info.rank} is outside the world of {info.world_size} ranks")
    environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    return info


def wait_for_rendezvous(info: LaunchInfo, timeout: float, poll: float = 0.5) -> None:
    """On ranks other than 0 of a slurm / mpi launch, wait until MASTER_ADDR:MASTER_PORT accepts a
    TCP connection (rank 0's rendezvous store), or raise LaunchError after ``timeout`` seconds.

    torchrun's workers need no wait (their agent's store is up before they start), nor does rank 0
    (it hosts the store).
    """
    if info.launcher not in ("slurm", "mpi") or info.rank == 0 or info.world_size == 1:
        return
    endpoint = f"MASTER_ADDR:MASTER_PORT = {info.master_addr}:{info.master_port}"
    deadline = time.monotonic() + timeout
    last_error: Optional[OSError] = None
    while True:
        try:
            with socket.create_connection(
                (info.master_addr, info.master_port), timeout=max(0.1, min(poll * 4, deadline - time.monotonic()))
            ):
                return
        except socket.gaierror as err:
            raise LaunchError(
                f"rank {info.rank}: cannot resolve the rendezvous host of {endpoint} ({err}); "
                "set MASTER_ADDR to an address the nodes can reach"
            ) from None
        except OSError as err:
            last_error = err
        if time.monotonic() >= deadline:
            raise LaunchError(
                f"rank {info.rank} of {info.world_size} could not reach the rendezvous at {endpoint} within "
                f"{timeout:g} s ({last_error}): rank 0 did not start or failed, or the address / port is not "
                "reachable from this node (firewall, wrong interface: set MASTER_ADDR / MASTER_PORT)"
            )
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def prepare_launch(
    cfg, launcher: str = "auto", rendezvous_timeout: float = 600.0, environ: Optional[MutableMapping[str, str]] = None
) -> LaunchInfo:
    """Everything before the process group: fill the environment for ``launcher``, check ``cfg``
    against the world size found (every rank reports a config problem at once, instead of ranks
    waiting for a rank 0 that already gave up), then wait for the rendezvous.

    Raises ConfigError or LaunchError.
    """
    import torch

    from megatron_ext.run import check_run

    info = bootstrap_environment(launcher, environ)
    check_run(cfg, info.world_size, cuda=torch.cuda.is_available())
    wait_for_rendezvous(info, rendezvous_timeout)
    return info
