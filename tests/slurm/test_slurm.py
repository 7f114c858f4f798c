"""The sbatch scripts and the srun launcher on a real one-node SLURM cluster (see cluster.py).

Jobs run slurm/train_cpu.sbatch as a user would submit it: one srun task running torchrun with
2 gloo ranks (SLURM_CPUS_ON_NODE = 2). The requeue tests stop a job mid-run, the way SLURM does
(`scontrol requeue`: SIGTERM to every process of the job; the time-limit warning
`--signal=B:USR1@120`: SIGUSR1 to the batch shell only), and check that the requeued job resumed
from the checkpoint and that metrics.jsonl has every step exactly once.
"""

import sys
import time
from pathlib import Path

import pytest

from megatron_ext.training.rundir import read_metrics
from tests.slurm.cluster import REPO, free_port, write_tiny_config

pytestmark = pytest.mark.slurm
CPU_SCRIPT = "slurm/train_cpu.sbatch"


def submit(cluster, tmp_path: Path, *train_args: str, script: str = CPU_SCRIPT, options=(), **env) -> int:
    env = {"PYTHON": sys.executable, "MASTER_PORT": str(free_port()), **env}
    return cluster.sbatch(script, *train_args, env=env, options=["--output", str(tmp_path / "job-%j.out"), *options])


def job_log(tmp_path: Path, job_id: int) -> str:
    path = tmp_path / f"job-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job output)"


def wait_for_steps(cluster, job_id: int, metrics: Path, steps: int, tmp_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} {state}:\n{job_log(tmp_path, job_id)}"
        assert time.monotonic() < deadline, f"job {job_id} wrote < {steps} steps:\n{job_log(tmp_path, job_id)}"
        time.sleep(0.1)


def resume_now(cluster, job_id: int) -> None:
    """Let a requeued job start soon: SLURM holds a requeued batch job back for two minutes
    (BeginTime), because a launch in the same second as the requeue would carry a credential the
    node has just revoked; a few seconds are enough on one node."""
    cluster.wait_for(job_id, states=("PENDING",))
    time.sleep(3)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def test_cpu_job_completes_and_writes_metrics(slurm_cluster, tmp_path):
    config, run_dir = write_tiny_config(tmp_path, steps=6), tmp_path / "run"
    job = submit(slurm_cluster, tmp_path, "--config", str(config), RUN_DIR=str(run_dir))
    info = slurm_cluster.wait_for(job, job_log=tmp_path / f"job-{job}.out")
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "1 node(s) x 2 rank(s)" in log, log
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 7))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    assert slurm_cluster.sacct(job, parsable=True).split() == ["COMPLETED|0:0"]
    print(f"[slurm] job {job}: {info['JobState']} exit {info['ExitCode']}\n{slurm_cluster.sacct(job)}")


def test_srun_tasks_as_ranks_with_slurm_launcher(slurm_cluster, tmp_path):
    """Without torchrun: one srun task per rank, the environment filled from SLURM's variables."""
    script = tmp_path / "srun_ranks.sbatch"
    script.write_text('#!/bin/bash\nsrun "$PYTHON" -m pretrain.train --launcher slurm "$@"\n')
    config, run_dir = write_tiny_config(tmp_path, steps=4), tmp_path / "run"
    job = submit(
        slurm_cluster,
        tmp_path,
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "--rendezvous-timeout",
        "60",
        script=str(script),
        options=["--ntasks=2", f"--chdir={REPO}"],
    )
    info = slurm_cluster.wait_for(job, job_log=tmp_path / f"job-{job}.out")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_log(tmp_path, job)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]


def test_job_refuses_an_allocation_of_another_size(slurm_cluster, tmp_path):
    job = submit(slurm_cluster, tmp_path, "--config", str(write_tiny_config(tmp_path, steps=2)), NODES="2")
    info = slurm_cluster.wait_for(job, job_log=tmp_path / f"job-{job}.out")
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log
    assert "planned for NODES=2 nodes but SLURM allocated 1" in log, log


def _check_resumed(cluster, job: int, run_dir: Path, steps: int, tmp_path: Path, stops: int) -> list:
    """The job completed after ``stops`` requeues, each resumed from the checkpoint its stop signal
    wrote; returns the steps it stopped at."""
    info = cluster.wait_for(job, job_log=tmp_path / f"job-{job}.out")
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", str(stops)), log
    checkpoint = run_dir / "checkpoints"
    stopped = [line for line in log.splitlines() if line.startswith("stop signal received: checkpointed at step")]
    assert len(stopped) == stops, log
    at = [int(line.split("at step ")[1].split(",")[0]) for line in stopped]
    for k in at:
        assert f"resumed from {checkpoint / f'step_{k:08d}'} at step {k}" in log, log
    assert 10 <= at[0] and at == sorted(set(at)) and at[-1] < steps, at
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, steps + 1)), (
        "every step exactly once: none lost, none repeated"
    )
    # One record per run: each requeued one (SLURM's jobcomp writes it as PENDING), the finished one.
    assert cluster.sacct(job, parsable=True).split() == ["PENDING|0:0"] * stops + ["COMPLETED|0:0"]
    record = cluster.run("scontrol", "show", "job", str(job)).stdout
    print(f"[slurm] job {job} stopped at steps {at}, resumed, finished {steps} steps\n{record}\n{cluster.sacct(job)}")
    return at


def test_scontrol_requeue_and_the_time_limit_signal_each_resume_from_checkpoint(slurm_cluster, tmp_path):
    """One job stopped twice: ``scontrol requeue`` (SIGTERM to every process of the job), then, in
    the resumed run, what ``--signal=B:USR1@120`` does 120 s before the time limit (SIGUSR1 to the batch
    shell only: the job checkpoints and requeues itself)."""
    steps, run_dir = 150, tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    job = submit(slurm_cluster, tmp_path, "--config", str(write_tiny_config(tmp_path, steps)), RUN_DIR=str(run_dir))
    wait_for_steps(slurm_cluster, job, metrics, 10, tmp_path)
    slurm_cluster.run("scontrol", "requeue", str(job))
    resume_now(slurm_cluster, job)
    logged = len(metrics.read_text().splitlines())  # the steps of the first run, up to its checkpoint
    wait_for_steps(slurm_cluster, job, metrics, logged + 10, tmp_path)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    resume_now(slurm_cluster, job)
    _check_resumed(slurm_cluster, job, run_dir, steps, tmp_path, stops=2)
    log = job_log(tmp_path, job)
    assert "[launch] SIGTERM" in log and "[launch] SIGUSR1" in log and f"requeueing job {job}" in log, log
