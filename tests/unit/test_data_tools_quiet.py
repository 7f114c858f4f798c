"""The data tools (``python -m data.*``) print their own lines only, as the training tools do:
Megatron-Core's known-irrelevant warnings are hidden (megatron_ext/quiet.py), --verbose shows them."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _preprocess(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    docs = tmp_path / "docs.txt"
    docs.write_text("one document\nanother document\n")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "data.preprocess",
            "--input",
            str(docs),
            "--output-prefix",
            str(tmp_path / "out" / "p"),
            "--tokenizer",
            "bytes",
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_preprocess_hides_known_warnings_unless_verbose(tmp_path):
    quiet, verbose = _preprocess(tmp_path), _preprocess(tmp_path, "--verbose")
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert "2 documents (0 empty skipped)" in quiet.stdout and "2 documents" in verbose.stdout
    assert "Warning" not in quiet.stderr, quiet.stderr
    assert "Apex are not installed" in verbose.stderr  # the filters hide, they do not break
