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
MASTER_ADDR:MASTER_PORT instead of hanging in ``init_process_group``; and :func:`open_rendezvous`
makes rank 0 host the job's store itself and every rank check in there within the same deadline: rank
0 fails when the other ranks do not all arrive, and a rank whose MASTER_ADDR:MASTER_PORT accepts TCP
but is not this job's store (another job's, or no store at all) fails naming it. The process group is
then built on that store (torch's ``TORCHELASTIC_USE_AGENT_STORE``: every rank a client of it).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, MutableMapping, Optional

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
    token: Optional[str] = field(default=None, compare=False)
    """What identifies this job in its rendezvous store (slurm: job and step ids; mpi: a random
    token rank 0 broadcasts)."""
    store: Any = field(default=None, compare=False, repr=False)
    """The job's rendezvous store (:func:`open_rendezvous`): rank 0 serves it while this object lives."""


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
    token = f"slurm job {environ.get('SLURM_JOB_ID', '?')} step {environ.get('SLURM_STEP_ID', '?')}"
    return LaunchInfo("slurm", rank, world, local_rank, addr, port, token)


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
            endpoint = (environ.get("MASTER_ADDR") or socket.gethostname(), port, f"mpi job {secrets.token_hex(8)}")
        except LaunchError as err:
            problem = str(err)
    # Every rank learns rank 0's endpoint, or its error (so that no rank waits for a bcast forever).
    endpoint, problem = comm.bcast((endpoint, problem), root=0)
    if problem:
        raise LaunchError(f"--launcher mpi, rank 0: {problem}")
    return LaunchInfo("mpi", rank, world, local_rank, *endpoint)


TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
"""Variables that only torchrun's agent sets in its workers."""


def _check_launcher_matches(launcher: str, environ: MutableMapping[str, str]) -> None:
    """Refuse a launcher that is not the one that started this process: ``--launcher mpi`` (or
    ``slurm``) in a torchrun worker would make every worker a one-rank job of its own (mpi4py sees a
    world of one), all training into one run directory; ``--launcher torchrun`` under mpirun has no
    torchrun environment."""
    by_torchrun = any(name in environ for name in TORCHRUN_VARS)
    if launcher in ("mpi", "slurm") and by_torchrun:
        raise LaunchError(
            f"--launcher {launcher}, but this process was started by torchrun (TORCHELASTIC_RUN_ID is set): "
            "use --launcher torchrun (or auto), or start the ranks with "
            + ("mpirun / srun --mpi=pmix" if launcher == "mpi" else "srun")
            + " without torchrun"
        )
    if launcher == "torchrun" and not by_torchrun and "RANK" not in environ:
        if any(name in environ for name in MPI_RANK_VARS):
            raise LaunchError(
                "--launcher torchrun, but this process was started by MPI (OMPI_COMM_WORLD_RANK / PMI_RANK / "
                "PMIX_RANK is set): use --launcher mpi (or auto)"
            )
        if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
            raise LaunchError(
                "--launcher torchrun, but this process is an srun task without torchrun: use --launcher slurm (or auto)"
            )


def bootstrap_environment(launcher: str = "auto", environ: Optional[MutableMapping[str, str]] = None) -> LaunchInfo:
    """Resolve ``launcher`` and write RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
    into ``environ`` (default ``os.environ``) for the slurm and mpi launchers."""
    environ = os.environ if environ is None else environ
    if launcher not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
    resolved = detect_launcher(environ) if launcher == "auto" else launcher
    _check_launcher_matches(resolved, environ)
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


TOKEN_KEY = "megatron_ext/rendezvous/job"
ARRIVED_KEY = "megatron_ext/rendezvous/arrived"
USE_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"
"""torch's switch: ``init_process_group`` connects to an existing store instead of starting one on rank 0."""


def open_rendezvous(
    info: LaunchInfo, timeout: float, environ: Optional[MutableMapping[str, str]] = None, poll: float = 0.2
) -> Optional[Any]:
    """For a slurm / mpi launch of several ranks: rank 0 starts the job's TCP store and waits until
    every other rank has checked in; the others connect and check that the store is this job's. All
    within ``timeout`` seconds, else LaunchError. Returns the store (keep it for the job's life: rank 0
    serves it), None where there is nothing to do."""
    from torch.distributed import TCPStore

    if info.launcher not in ("slurm", "mpi") or info.world_size == 1:
        return None
    environ = os.environ if environ is None else environ
    endpoint = f"MASTER_ADDR:MASTER_PORT = {info.master_addr}:{info.master_port}"
    deadline = time.monotonic() + timeout

    def left() -> timedelta:
        return timedelta(seconds=max(0.1, deadline - time.monotonic()))

    if info.rank == 0:
        try:
            store = TCPStore(
                info.master_addr,
                info.master_port,
                info.world_size,
                is_master=True,
                timeout=left(),
                wait_for_workers=False,
            )
        except Exception as err:  # torch raises RuntimeError / DistNetworkError subclasses
            raise LaunchError(
                f"rank 0 cannot host the rendezvous at {endpoint} ({str(err).splitlines()[0]}): set MASTER_PORT to "
                "a free port on this node"
            ) from None
        store.set(TOKEN_KEY, info.token or "")
        while (arrived := store.add(ARRIVED_KEY, 0)) < info.world_size - 1:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"rank 0: only {arrived} of the other {info.world_size - 1} ranks reached the rendezvous at "
                    f"{endpoint} within {timeout:g} s (--rendezvous-timeout): the others did not start, failed, or "
                    "cannot reach this node (check the job's tasks and MASTER_ADDR / MASTER_PORT)"
                )
            time.sleep(poll)
    else:
        not_ours = (
            f"rank {info.rank}: {endpoint} accepts connections but is not this job's rendezvous ({{}}): another "
            "service or job uses that port; set MASTER_PORT to a free port"
        )
        connected: dict = {}

        def connect() -> None:  # a peer that accepts TCP but never answers blocks the client's handshake
            try:
                client = TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False, timeout=left())
                client.wait([TOKEN_KEY], left())
                connected.update(store=client, token=client.get(TOKEN_KEY).decode(errors="replace"))
            except Exception as err:  # torch raises RuntimeError / DistStoreError subclasses
                connected["error"] = str(err).splitlines()[0] if str(err) else type(err).__name__

        thread = threading.Thread(target=connect, name="rendezvous-check", daemon=True)
        thread.start()
        thread.join(left().total_seconds() + poll)
        if "store" not in connected:
            raise LaunchError(not_ours.format(f"no answer within {timeout:g} s: {connected.get('error', 'silence')}"))
        store, token = connected["store"], connected["token"]
        if token != (info.token or ""):
            raise LaunchError(not_ours.format(f"it serves {token!r}, this rank is of {info.token!r}"))
        store.add(ARRIVED_KEY, 1)
    environ[USE_STORE_ENV] = "True"
    return store


def prepare_launch(
    cfg, launcher: str = "auto", rendezvous_timeout: float = 600.0, environ: Optional[MutableMapping[str, str]] = None
) -> LaunchInfo:
    """Everything before the process group: fill the environment for ``launcher``, check ``cfg``
    against the world size found (every rank reports a config problem at once, instead of ranks
    waiting for a rank 0 that already gave up), then the rendezvous (:func:`wait_for_rendezvous`,
    :func:`open_rendezvous`), all within ``rendezvous_timeout`` seconds on every rank. Keep the returned
    info for the job's life (it holds the store).

    Raises ConfigError or LaunchError.
    """
    import torch

    from megatron_ext.run import check_run

    info = bootstrap_environment(launcher, environ)
    check_run(cfg, info.world_size, cuda=torch.cuda.is_available())
    start = time.monotonic()
    wait_for_rendezvous(info, rendezvous_timeout)
    store = open_rendezvous(info, max(0.1, rendezvous_timeout - (time.monotonic() - start)), environ)
    return replace(info, store=store)
