"""``pretrain.generate`` under bad input: an absurd ``--max-new-tokens`` (a KV cache larger than the
machine) and prompt ids that are not integers are refused with one message, before the model loads."""

import subprocess
import sys
from pathlib import Path

import yaml

from tests.configs import TINY, merge

REPO = Path(__file__).resolve().parents[2]


def _generate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(merge(TINY, {"name": "tiny", "data": {"kind": "synthetic"}})))
    return subprocess.run(
        [sys.executable, "-m", "pretrain.generate", "--run-dir", str(run_dir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_absurd_new_tokens_and_bad_prompt_ids_are_refused(tmp_path):
    done = _generate(tmp_path, "--prompt-ids", "1 2 3", "--max-new-tokens", str(10**13))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"--max-new-tokens={10**13}" in done.stderr and "KV cache" in done.stderr, done.stderr
    done = _generate(tmp_path, "--prompt-ids", "1 two 3")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--prompt-ids" in done.stderr and "integers" in done.stderr, done.stderr
