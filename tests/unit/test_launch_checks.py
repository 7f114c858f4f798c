"""The training entry point's launch options: a launcher that is not the one that started the process
is refused naming the right one, a rendezvous timeout must be a positive number of seconds, rank 0
honours it too, and a port that answers but is not this job's store is refused."""

import socket
import threading

import pytest

from megatron_ext.launch.bootstrap import USE_STORE_ENV, LaunchError, LaunchInfo, bootstrap_environment, open_rendezvous
from pretrain.train import parse_args
from tests.slurm.cluster import free_port

TORCHRUN_WORKER = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "none",
}


@pytest.mark.parametrize("launcher", ["mpi", "slurm"])
def test_mpi_or_slurm_inside_torchrun_is_refused(launcher):
    env = dict(TORCHRUN_WORKER, SLURM_PROCID="0", SLURM_STEP_ID="0", SLURM_NTASKS="1", SLURM_LOCALID="0")
    with pytest.raises(LaunchError, match="started by torchrun.*use --launcher torchrun"):
        bootstrap_environment(launcher, env)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2", "nothing was rewritten"


def test_torchrun_under_mpirun_or_srun_is_refused_naming_the_right_one():
    with pytest.raises(LaunchError, match="started by MPI.*use --launcher mpi"):
        bootstrap_environment("torchrun", {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="use --launcher slurm"):
        bootstrap_environment("torchrun", {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_a_rendezvous_timeout_must_be_positive_seconds(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--config", "c.yaml", "--rendezvous-timeout", value])
    assert exit_.value.code == 2
    assert "--rendezvous-timeout" in capsys.readouterr().err


def _slurm_rank(rank: int, port: int, job: str = "7") -> LaunchInfo:
    return LaunchInfo("slurm", rank, 2, rank, "127.0.0.1", port, f"slurm job {job} step 0")


def test_rank0_honours_the_rendezvous_timeout():
    env = {}
    with pytest.raises(
        LaunchError, match=r"rank 0: only 0 of the other 1 ranks reached the rendezvous .* within 1.5 s"
    ):
        open_rendezvous(_slurm_rank(0, free_port()), timeout=1.5, environ=env)
    assert USE_STORE_ENV not in env


def test_a_port_that_accepts_but_is_not_the_jobs_store_is_refused():
    with socket.socket() as server:  # accepts TCP, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        with pytest.raises(LaunchError, match="accepts connections but is not this job's rendezvous"):
            open_rendezvous(_slurm_rank(1, server.getsockname()[1]), timeout=2, environ={})
    port = free_port()
    other = {}
    host = threading.Thread(target=lambda: other.update(store=_try_host(_slurm_rank(0, port, job="8"))))
    host.start()  # another job's rank 0: a real store, with that job's token
    with pytest.raises(LaunchError, match="it serves 'slurm job 8 step 0'"):
        open_rendezvous(_slurm_rank(1, port), timeout=20, environ={})
    host.join()


def _try_host(info):
    try:
        return open_rendezvous(info, timeout=3, environ={})
    except LaunchError as err:
        return err


def test_ranks_meet_in_the_jobs_store():
    port, hosted, env = free_port(), {}, {}
    host = threading.Thread(target=lambda: hosted.update(store=open_rendezvous(_slurm_rank(0, port), 60, environ={})))
    host.start()
    client = open_rendezvous(_slurm_rank(1, port), timeout=60, environ=env)
    host.join()
    assert hosted["store"] is not None and client is not None and env[USE_STORE_ENV] == "True"
