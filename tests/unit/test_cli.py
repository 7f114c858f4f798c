"""The ``megatron-ext`` command that ``pip install`` puts beside the interpreter runs every tool
from any directory."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMAND = Path(sys.executable).parent / "megatron-ext"


def run(*args, cwd):
    return subprocess.run([str(COMMAND), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_installed_command_runs_tools_from_another_directory(tmp_path):
    assert COMMAND.is_file(), f"{COMMAND} is missing: `pip install -e .` (make setup) installs it"
    listing = run(cwd=tmp_path)
    assert listing.returncode == 2 and "launch" in listing.stdout and "preprocess" in listing.stdout
    params = run("params", "--config", str(REPO / "configs" / "smoke.yaml"), cwd=tmp_path)
    assert params.returncode == 0, params.stderr
    assert params.stdout.startswith("smoke: total 0.54M"), params.stdout
    bad = run("params", "--config", str(REPO / "configs" / "smoke.yaml"), "--set", "train.lr=-1", cwd=tmp_path)
    assert bad.returncode == 2 and "train.lr=-1.0 must be positive" in bad.stderr and "Traceback" not in bad.stderr
    unknown = run("nonsense", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown subcommand 'nonsense'" in unknown.stderr
