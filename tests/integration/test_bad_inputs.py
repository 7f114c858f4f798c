"""Bad inputs to the training entry point end in one message naming the file or field and the fix,
with no traceback: a config that is not UTF-8, an allocation file without ``layers``, a
``data.cache_dir`` that cannot be written, a ``--run-dir`` that is a file, and a learning rate so
large that every loss is non-finite."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.configs import TINY, merge

REPO = Path(__file__).resolve().parents[2]
BASE = merge(
    TINY,
    {
        "name": "bad",
        "data": {"kind": "synthetic"},
        "train": {"steps": 2, "warmup_steps": 1, "eval_interval": 0},
        "checkpoint": {"save_at_end": False},
    },
)


def _train(tmp_path: Path, config: dict, *args: str, raw: bytes = b"") -> subprocess.CompletedProcess:
    path = tmp_path / "bad.yaml"
    path.write_bytes(raw or yaml.safe_dump(config).encode())
    cmd = [sys.executable, "-m", "pretrain.train", "--config", str(path)]
    if "--run-dir" not in args:
        cmd += ["--run-dir", str(tmp_path / "run")]
    return subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def _one_message(done: subprocess.CompletedProcess, status: int, *needles: str) -> None:
    assert done.returncode == status, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_a_config_that_is_not_utf8(tmp_path):
    raw = yaml.safe_dump(BASE).encode().replace(b"name: bad", b"name: b\xe4d")  # Latin-1
    done = _train(tmp_path, BASE, raw=raw)
    _one_message(done, 2, "bad.yaml", "is not UTF-8", "save it as UTF-8")
    assert not (tmp_path / "run").exists()


def test_an_allocation_file_without_layers(tmp_path):
    allocation = tmp_path / "allocation.json"
    allocation.write_text(json.dumps({"granularity": "layer", "window": 8}))
    config = merge(
        BASE, {"hybrid_attention": {"enabled": True, "method": "static", "window": 8, "allocation": str(allocation)}}
    )
    done = _train(tmp_path, config)
    _one_message(done, 2, "hybrid_attention.allocation", str(allocation), "no key 'layers'")
    assert not (tmp_path / "run").exists()


def test_a_cache_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    config = merge(BASE, {"data": {"kind": "default", "cache_dir": str(blocker / "cache")}})
    done = _train(tmp_path, config)
    _one_message(done, 2, "data.cache_dir", "is a file, not a directory", "writable directory")
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "run_file"
    blocker.write_text("a file")
    done = _train(tmp_path, BASE, "--run-dir", str(blocker))
    _one_message(done, 2, str(blocker), "is a file, not a directory", "--run-dir")
    assert blocker.read_text() == "a file"


def test_a_learning_rate_that_makes_every_loss_nonfinite(tmp_path):
    config = merge(BASE, {"train": {"steps": 40, "lr": 1.0e30, "max_consecutive_nonfinite": 2}})
    done = _train(tmp_path, config)
    _one_message(done, 1, "non-finite", "train.lr")
