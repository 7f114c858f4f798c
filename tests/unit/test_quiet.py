"""The command-line tools print their own lines only: Megatron-Core's and torch's known-irrelevant
warnings are hidden (megatron_ext/quiet.py), and --verbose shows them again."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _params(*extra):
    return subprocess.run(
        [sys.executable, "-m", "pretrain.params", "--config", "configs/smoke.yaml", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tools_hide_known_warnings_unless_verbose():
    quiet, verbose = _params(), _params("--verbose")
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert "smoke: total" in quiet.stdout and "smoke: total" in verbose.stdout
    assert "Warning" not in quiet.stderr, quiet.stderr
    assert "Apex is not installed" in verbose.stderr  # the filters hide, they do not break
