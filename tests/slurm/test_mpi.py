"""Ranks started by mpirun (no torchrun): the MPI bootstrap fills the environment from mpi4py."""

import subprocess
import sys

import pytest

from megatron_ext.training.rundir import read_metrics
from tests.slurm.cluster import REPO, clean_environment, write_tiny_config

pytestmark = pytest.mark.slurm


def test_mpirun_two_ranks_train(mpi_ready, tmp_path):
    config, run_dir = write_tiny_config(tmp_path, steps=5), tmp_path / "run"
    cmd = [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
        "--mca",
        "btl",
        "self,tcp",
        "-np",
        "2",
        sys.executable,
        "-m",
        "pretrain.train",
        "--launcher",
        "mpi",
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "--rendezvous-timeout",
        "60",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_environment(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert "step      5/5" in out
