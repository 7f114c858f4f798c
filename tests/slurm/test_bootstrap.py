"""The launch bootstrap: torchrun's environment from SLURM's (and MPI's) variables, launcher
detection, and a rendezvous that cannot be reached failing fast with a clear message."""

import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from megatron_ext.config import ConfigError
from megatron_ext.launch.bootstrap import (
    LaunchError,
    LaunchInfo,
    bootstrap_environment,
    detect_launcher,
    first_host,
    prepare_launch,
    wait_for_rendezvous,
)
from megatron_ext.run import load_config
from tests.slurm.cluster import REPO, clean_environment, free_port, write_tiny_config

SRUN_TASK = {
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
}


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("node1", "node1"),
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("a[1-2]b[3-4]", "a1b3"),
        ("rack1-n[12,14]", "rack1-n12"),
        ("x,y", "x"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_detects_the_launcher():
    assert detect_launcher({"RANK": "0", **SRUN_TASK}) == "torchrun"  # torchrun inside an srun task
    assert detect_launcher({"OMPI_COMM_WORLD_RANK": "1", **SRUN_TASK}) == "mpi"  # mpirun inside a job
    assert detect_launcher({"PMIX_RANK": "0"}) == "mpi"
    assert detect_launcher(dict(SRUN_TASK)) == "slurm"
    batch_script = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    assert detect_launcher(batch_script) == "single"  # the batch shell itself: not a rank
    assert detect_launcher({}) == "single"


def test_environment_from_slurm_variables():
    env = dict(SRUN_TASK)
    info = bootstrap_environment("auto", env)
    assert info == LaunchInfo("slurm", 3, 4, 1, "gpu07", 21234)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "21234",
    }
    explicit = dict(SRUN_TASK, MASTER_ADDR="10.0.0.1", MASTER_PORT="29500", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1")
    assert bootstrap_environment("slurm", explicit) == LaunchInfo("slurm", 1, 2, 1, "10.0.0.1", 29500)


def test_launcher_errors_are_clear():
    batch_script = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    with pytest.raises(LaunchError, match="not inside an srun job step"):
        bootstrap_environment("slurm", batch_script)
    with pytest.raises(LaunchError, match="SLURM_NTASKS=None is missing"):
        bootstrap_environment("slurm", {k: v for k, v in SRUN_TASK.items() if k != "SLURM_NTASKS"})
    with pytest.raises(LaunchError, match="rank 5 is outside the world of 4 ranks"):
        bootstrap_environment("slurm", dict(SRUN_TASK, SLURM_PROCID="5"))
    with pytest.raises(LaunchError, match="--launcher torchrun but RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        bootstrap_environment("torchrun", {})


def test_mpi_launcher_without_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails as if it were not installed
    with pytest.raises(LaunchError, match=r"needs mpi4py .*pip install \.\[mpi\]"):
        bootstrap_environment("mpi", {"OMPI_COMM_WORLD_RANK": "0"})


def test_unreachable_rendezvous_times_out_with_a_clear_message():
    port = free_port()  # nothing listens on it
    start = time.monotonic()
    with pytest.raises(LaunchError) as err:
        wait_for_rendezvous(LaunchInfo("slurm", 1, 2, 1, "127.0.0.1", port), timeout=1.5)
    assert time.monotonic() - start < 5
    assert (
        f"rank 1 of 2 could not reach the rendezvous at MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port} within 1.5 s"
        in str(err.value)
    )
    with pytest.raises(LaunchError, match="cannot resolve the rendezvous host"):
        wait_for_rendezvous(LaunchInfo("mpi", 1, 2, 1, "no-such-host.invalid", port), timeout=30)


def test_reachable_rendezvous_returns_at_once():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.monotonic()
        wait_for_rendezvous(LaunchInfo("slurm", 1, 2, 1, "127.0.0.1", server.getsockname()[1]), timeout=30)
        assert time.monotonic() - start < 2
    wait_for_rendezvous(LaunchInfo("slurm", 0, 2, 0, "127.0.0.1", 1), timeout=0)  # rank 0 hosts it: no wait


def test_sizes_that_do_not_fit_fail_before_the_rendezvous(tmp_path):
    cfg = load_config(write_tiny_config(tmp_path, steps=2))
    cfg = replace(cfg, parallel=replace(cfg.parallel, tensor=4))
    start = time.monotonic()
    with pytest.raises(ConfigError, match="world size 2 is not divisible"):
        prepare_launch(
            cfg, "slurm", rendezvous_timeout=600, environ=dict(SRUN_TASK, SLURM_NTASKS="2", SLURM_PROCID="1")
        )
    assert time.monotonic() - start < 120  # it did not wait for the 600 s rendezvous timeout


def test_training_entry_reports_an_unreachable_rendezvous(tmp_path):
    port = free_port()
    env = clean_environment(
        **dict(SRUN_TASK, SLURM_PROCID="1", SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    )
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            "--config",
            str(write_tiny_config(tmp_path, 2)),
            "--run-dir",
            str(tmp_path / "run"),
            "--rendezvous-timeout",
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 3, proc.stderr
    assert f"could not reach the rendezvous at MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port} within 2 s" in proc.stderr
    assert time.monotonic() - start < 300  # Python and torch start-up, then 2 s of waiting: no hang
