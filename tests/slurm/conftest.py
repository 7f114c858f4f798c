"""Fixtures of the SLURM / MPI tests: a real one-node SLURM cluster, and mpirun with mpi4py.

Both install what is missing (Debian packages with apt-get, mpi4py from this project's ``mpi``
extra); they skip only where that is impossible (no apt-get, or not root).
"""

import os

import pytest

from tests.slurm.cluster import LocalSlurm, SetupUnavailable, ensure_debian_packages, ensure_python_extra

SLURM_PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge"}
MPI_PACKAGES = {"mpirun": "openmpi-bin", "mpicc": "libopenmpi-dev"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slurm: runs jobs on a real local SLURM cluster or under mpirun (installs slurm-wlm, "
        "munge and Open MPI with apt-get when missing; needs root)",
    )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    try:
        ensure_debian_packages(SLURM_PACKAGES)
    except SetupUnavailable as err:
        pytest.skip(f"no SLURM: {err}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def mpi_ready():
    try:
        ensure_debian_packages(MPI_PACKAGES)
    except SetupUnavailable as err:
        pytest.skip(f"no MPI: {err}")
    ensure_python_extra("mpi", "mpi4py.MPI")
