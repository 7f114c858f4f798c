"""``experiment run --slurm`` on a real one-node SLURM cluster (see cluster.py): one job per run of
slurm/train_cpu.sbatch, the variant's job held until the shared start's has succeeded (``afterok``) and
then starting from its weights; ``--evaluate-only`` afterwards evaluates both and marks them finished."""

import sys
from pathlib import Path

import pytest
import yaml

from megatron_ext.experiments.runner import read_done, run_experiment, submit_slurm
from megatron_ext.experiments.spec import load_spec
from tests.configs import TINY, merge
from tests.slurm.cluster import REPO, free_port

pytestmark = pytest.mark.slurm


def test_variant_job_waits_for_the_shared_start_then_evaluates(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # sbatch from the repository root, as a user submits
    base = merge(
        TINY,
        {
            "name": "tiny",
            "data": {"kind": "synthetic", "seq_length": 32},
            "train": {"steps": 3, "eval_interval": 3, "eval_steps": 1},
            "checkpoint": {"save_interval": 0},
            "logging": {"log_interval": 1},
        },
    )
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "slurm_table",
                "base": str(tmp_path / "base.yaml"),
                "output": str(tmp_path / "out"),
                "nproc": 2,
                "seeds": [5],
                "start": {"name": "start"},
                "variants": [{"name": "longer", "overrides": {"train.steps": 4}}],
                "evaluations": {"validation_batches": 1},
                "slurm": {"script": "slurm/train_cpu.sbatch", "options": [f"--output={tmp_path}/job-%j.out"]},
            }
        )
    )
    spec = load_spec(spec_path)
    env = {**slurm_cluster.env, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}

    def sbatch(cmd):
        return slurm_cluster.run(*cmd, cwd=REPO, env=env).stdout.strip().split(";")[0]

    jobs = submit_slurm(spec, sbatch=sbatch, log=lambda line: None)
    assert list(jobs) == ["start", "longer/seed5"]
    assert slurm_cluster.job(int(jobs["longer/seed5"]))["Dependency"] == f"afterok:{jobs['start']}(unfulfilled)"
    for key, job in jobs.items():
        info = slurm_cluster.wait_for(int(job), job_log=tmp_path / f"job-{job}.out")
        log = (tmp_path / f"job-{job}.out").read_text(errors="replace")
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    variant_log = (tmp_path / f"job-{jobs['longer/seed5']}.out").read_text(errors="replace")
    assert f"initialized the model weights from {tmp_path / 'out' / 'start' / 'checkpoints'}" in variant_log

    lines = []
    assert run_experiment(spec, evaluate_only=True, log=lines.append) == 0, "\n".join(lines)
    for run_dir in (tmp_path / "out" / "start", tmp_path / "out" / "longer" / "seed5"):
        assert read_done(Path(run_dir))["figures"]["val_loss"] > 0
