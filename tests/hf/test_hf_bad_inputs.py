"""HF import under bad input: refused with one message naming the file, no traceback, nothing
written, nothing unpickled: pickled weights only, a malformed or oversized safetensors header, a
config.json whose sizes do not belong to the weights."""

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf.models import build_hf

REPO = Path(__file__).resolve().parents[2]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf("dense", tmp_path_factory.mktemp("hf") / "dense")


def _import(source: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.hf", "import", "--hf-dir", str(source), "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _refused(done: subprocess.CompletedProcess, output: Path, *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr
    assert not output.exists(), "nothing written"


def test_pickled_weights_only_are_refused_unread(hf_dir, tmp_path):
    source = tmp_path / "pickled"
    source.mkdir()
    shutil.copy2(hf_dir / "config.json", source / "config.json")
    marker = tmp_path / "owned"
    (source / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    _refused(_import(source, tmp_path / "run"), tmp_path / "run", "pytorch_model.bin", "never loaded", "safetensors")
    assert not marker.exists(), "the pickle was never loaded"


@pytest.mark.parametrize("header", ["malformed", "oversized"])
def test_a_bad_safetensors_header_is_refused(hf_dir, tmp_path, header):
    source = tmp_path / "source"
    shutil.copytree(hf_dir, source)
    weights = source / "model.safetensors"
    if header == "malformed":
        body = b"{not json"
        weights.write_bytes(struct.pack("<Q", len(body)) + body)
    else:  # claims a 1 TiB header
        weights.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    _refused(_import(source, tmp_path / "run"), tmp_path / "run", str(weights), "not a readable safetensors file")


def test_a_config_whose_sizes_do_not_fit_the_weights_is_refused_before_building(hf_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(hf_dir, source)
    config = json.loads((source / "config.json").read_text())
    config.update(hidden_size=2**20, intermediate_size=2**22, num_hidden_layers=4096)
    (source / "config.json").write_text(json.dumps(config))
    _refused(_import(source, tmp_path / "run"), tmp_path / "run", "config.json", "does not belong to these weights")
