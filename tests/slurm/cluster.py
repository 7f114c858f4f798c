"""A real one-node SLURM cluster on this machine, for the tests: munged, slurmctld and slurmd
started from a generated slurm.conf in a scratch directory, and helpers to submit and watch jobs.

Everything the cluster writes (config, state, spool, logs, munge key and socket) stays in that
directory; the ports are free ones picked at start, so it does not clash with a system SLURM or
with another instance of these tests. Needs root (the daemons run as root, as SlurmUser) and
Debian's slurm-wlm and munge packages (:func:`ensure_debian_packages` installs what is missing).
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


class SetupUnavailable(RuntimeError):
    """The machine cannot host the cluster (a reason to skip, with this message)."""


def ensure_debian_packages(binaries: Dict[str, str]) -> None:
    """Install the Debian package of every binary in ``binaries`` ({binary: package}) not on PATH."""
    missing = sorted({pkg for binary, pkg in binaries.items() if shutil.which(binary) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SetupUnavailable(f"{', '.join(missing)} not installed and apt-get is unavailable to install them")
    if os.geteuid() != 0:
        raise SetupUnavailable(f"{', '.join(missing)} not installed, and installing them needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", *missing]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        # Stale or absent package lists: refresh them once, then install for real.
        subprocess.run(
            ["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q"], env=env, capture_output=True, check=True
        )
        subprocess.run(install, env=env, capture_output=True, check=True)


def ensure_python_extra(extra: str, module: str) -> None:
    """Make ``module`` importable by this interpreter, installing the requirements of this
    project's ``extra`` (setup.cfg [options.extras_require]) if it is not."""
    check = [sys.executable, "-c", f"import {module}"]
    if subprocess.run(check, capture_output=True).returncode == 0:
        return
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    requirements = parser["options.extras_require"][extra].split()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *requirements], check=True)
    subprocess.run(check, capture_output=True, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_environment(**extra: str) -> Dict[str, str]:
    """This process's environment without variables of an enclosing SLURM job or torchrun, plus ``extra``."""
    launch_vars = {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "NODES",
        "RUN_DIR",
        "NPROC_PER_NODE",
    }
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "OMPI_", "PMI_", "PMIX_")) and k not in launch_vars
    }
    env.update(extra)
    return env


def _slurm_conf(root: Path, host: str, ctld_port: int, slurmd_port: int, cpus: int) -> str:
    return f"""\
ClusterName=local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
KillWait=60
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=local Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """munged + slurmctld + slurmd on localhost; :meth:`start`, then :meth:`stop` (always)."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.host = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self.env = clean_environment(SLURM_CONF=str(self.conf))
        self._daemons: Dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        with open(self.root / f"{name}.out", "w") as log:
            self._daemons[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def start(self, timeout: float = 60) -> None:
        munge = self.root / "munge"
        for sub in (munge, self.root / "state", self.root / "spool"):
            sub.mkdir(parents=True, exist_ok=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={munge}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={munge}/munged.pid",
                f"--seed-file={munge}/munged.seed",
                f"--log-file={munge}/munged.log",
            ],
        )
        self._wait(lambda: (munge / "munge.socket").exists(), 20, "munged did not create its socket")
        self.conf.write_text(_slurm_conf(self.root, self.host, free_port(), free_port(), self.cpus))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(
            lambda: self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle",
            timeout,
            "the node did not become idle",
        )

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, p in self._daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} (exited: {dead or 'none'}); logs:\n{self.logs()}")
            time.sleep(0.25)

    def logs(self) -> str:
        parts = []
        for name in ("munged.out", "slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        ctld = self._daemons.get("slurmctld")
        if ctld is not None and ctld.poll() is None:  # end the jobs first: their steps belong to slurmd
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._daemons.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._daemons.clear()

    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(
            list(argv),
            env=kwargs.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=kwargs.pop("timeout", 60),
            **kwargs,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}{result.stdout}")
        return result

    def sbatch(
        self,
        script: str,
        *args: str,
        options: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
        cwd: Path = REPO,
    ) -> int:
        """Submit ``script`` (arguments ``args``) with sbatch ``options``; return the job id."""
        out = self.run("sbatch", "--parsable", *options, script, *args, cwd=cwd, env={**self.env, **(env or {})})
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", text))

    def wait_for(
        self,
        job_id: int,
        states: Sequence[str] = tuple(TERMINAL_STATES),
        timeout: float = 600,
        job_log: Optional[Path] = None,
    ) -> Dict[str, str]:
        """Poll until the job is in one of ``states``; return its ``scontrol show job`` fields.

        The timeout is generous: it only matters when something is wrong, and a busy machine can
        take minutes to start two ranks."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                output = job_log.read_text(errors="replace") if job_log and job_log.exists() else "(none)"
                raise TimeoutError(
                    f"job {job_id} still {info.get('JobState')} after {timeout} s; its output:\n{output}\n{self.logs()}"
                )
            time.sleep(0.5)

    def sacct(self, job_id: int, parsable: bool = False) -> str:
        """Completion records of the job, one per time it ended (sacct reads them from the jobcomp
        file: this cluster has no accounting database)."""
        fields = ["-o", "JobID,JobName,State,ExitCode,Start,End,NodeList"]
        if parsable:
            fields = ["--parsable2", "--noheader", "-o", "State,ExitCode"]
        return self.run("sacct", "--completion", "-j", str(job_id), *fields).stdout


def write_tiny_config(directory: Path, steps: int) -> Path:
    """A two-rank MoE config (EP = 2) that trains a step in tens of milliseconds on a CPU."""
    import yaml

    config = {
        "name": "tiny",
        "model": {
            "num_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_query_groups": 2,
            "ffn_hidden_size": 64,
            "vocab_size": 256,
        },
        "parallel": {"tensor": 1, "pipeline": 1, "expert": 2},
        "data": {"kind": "synthetic", "seq_length": 32},
        "train": {
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "steps": steps,
            "lr": 3.0e-3,
            "warmup_steps": min(2, steps - 1),
        },
        "checkpoint": {"save_interval": 0, "keep_last": 2},
        "logging": {"log_interval": 1, "tensorboard": False},
        "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32},
    }
    path = Path(directory) / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
