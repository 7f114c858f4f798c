"""HF interop that loses nothing: an export never deletes what it did not write (a non-empty
directory that is not an earlier export is refused before any work; an earlier export has only its
own files replaced), and an imported run resumes exactly (its optimizer and LR schedule restored from
the first checkpoint that has them: the losses of an interrupted run equal an uninterrupted one's), and
a ConSA checkpoint of the dense warm-up exports as the dense model it is (a run that ends before mask
learning starts is warned)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.parallel import ParallelSizes
from megatron_ext.testing.distributed import run_distributed
from tests.configs import TINY
from tests.hf.models import build_hf, hf_logits, our_logits, rel_diff

REPO = Path(__file__).resolve().parents[2]
TRAIN = [
    "data.kind=synthetic",
    "data.seq_length=16",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.steps=4",
    "train.warmup_steps=1",
    "train.eval_interval=0",
    "checkpoint.save_interval=2",
    "checkpoint.keep_last=3",
    "logging.tensorboard=false",
]


def _import(hf_dir, output):
    from megatron_ext.training.hf import import_hf

    return str(import_hf(Path(hf_dir), Path(output)))


def _train(run_dir):
    from megatron_ext.run import load_config
    from megatron_ext.training.loop import Trainer

    cfg = load_config(Path(run_dir) / "config.yaml", TRAIN)
    lines = []
    return Trainer(cfg, Path(run_dir), log=lines.append).run().losses, lines


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    hf_dir = build_hf("dense", root / "hf")
    run_distributed(_import, 1, ParallelSizes(), hf_dir=str(hf_dir), output=str(root / "run"))
    return root / "run"


def test_an_imported_run_resumes_exactly(imported, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    shutil.copytree(imported, straight)
    reference, _ = run_distributed(_train, 1, None, run_dir=str(straight))[0]
    # Interrupted after step 2: the same run (the same command on a copy of the same import) up to
    # there, its step 4 checkpoint never written.
    shutil.copytree(straight, interrupted)
    checkpoints = interrupted / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").write_text("step_00000002")
    resumed, lines = run_distributed(_train, 1, None, run_dir=str(interrupted))[0]
    assert any(line.startswith("resumed from") and "at step 2" in line for line in lines), lines
    assert "new layout" not in "".join(lines), "the RNG streams and the optimizer were restored"
    print(f"[hf resume] uninterrupted {reference}, resumed at step 2 {resumed}")
    assert resumed == reference[2:]


def _export(run_dir, output):
    from megatron_ext.training.hf import export_hf

    return str(export_hf(Path(run_dir), Path(output)))


def _export_cli(run_dir: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.hf", "export", "--run-dir", str(run_dir), "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_export_never_deletes_what_it_did_not_write(imported, tmp_path):
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    done = _export_cli(imported, precious)
    assert done.returncode == 2 and "is not an earlier export" in done.stderr and "notes.txt" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"], "nothing written, nothing removed"
    assert [p.name for p in tmp_path.iterdir()] == ["work"], "no temporary directory left behind"

    export = tmp_path / "export"
    run_distributed(_export, 1, ParallelSizes(), run_dir=str(imported), output=str(export))
    first = sorted(p.name for p in export.iterdir())
    assert "model.safetensors" in first and "config.json" in first
    (export / "README.md").write_text("a model card someone wrote")
    (export / "model.safetensors").write_bytes(b"stale")
    run_distributed(_export, 1, ParallelSizes(), run_dir=str(imported), output=str(export))
    assert (export / "README.md").read_text() == "a model card someone wrote", "only the export's own files go"
    assert (export / "model.safetensors").stat().st_size > 5
    assert sorted(p.name for p in export.iterdir()) == sorted([*first, "README.md"])


WARMUP_ONLY = {
    "model": {**TINY["model"], "vocab_size": 300},
    "data": {"kind": "synthetic", "seq_length": 32},
    "train": {"micro_batch_size": 2, "global_batch_size": 4, "steps": 2, "warmup_steps": 1, "lr": 1.0e-2},
    "checkpoint": {"save_at_end": True},
    "logging": {"tensorboard": False},
    "hybrid_attention": {
        "enabled": True,
        "method": "consa",
        "granularity": "kv_head",
        "window": 8,
        "target": 0.5,
        "mask_learning_start_step": 5,
        "mask_learning_steps": 4,
    },
}
"""A ConSA run that ends in its dense warm-up: mask learning would start after step 5."""


def _train_warmup_only(run_dir):
    from megatron_ext.config import from_dict
    from megatron_ext.run import RunConfig
    from megatron_ext.training.loop import Trainer

    lines = []
    Trainer(from_dict(RunConfig, WARMUP_ONLY), Path(run_dir), log=lines.append).run()
    return lines


def test_a_dense_warmup_checkpoint_exports_as_the_dense_model_it_is(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    lines = run_distributed(_train_warmup_only, 1, None, run_dir=str(run_dir))[0]
    warnings = [line for line in lines if "before mask learning starts" in line]
    assert len(warnings) == 1 and "train.steps=2" in warnings[0] and "mask_learning_start_step=5" in warnings[0]
    run_distributed(_export, 1, ParallelSizes(), run_dir=str(run_dir), output=str(out))
    config = json.loads((out / "config.json").read_text())
    assert "layer_types" not in config and not (out / "modeling_hybrid.py").exists(), config
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = run_distributed(our_logits, 1, ParallelSizes(), run_dir=str(run_dir), tokens=tokens, tp=1)[0]
    diff = rel_diff(ours, hf_logits(out, tokens))
    print(f"[hf export dense warm-up as {config['architectures'][0]}] max |logit diff| / max |logit|: {diff:.2e}")
    assert diff <= 1e-5
