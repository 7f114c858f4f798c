"""Evaluating a checkpoint gives the trained model, not its weights alone: the validation loss of
``evaluate_checkpoint`` equals the one the training loop logged at the same step, for a model whose
structure lives in the capabilities' states (a binarized hybrid attention allocation, grown SGT
loops, MoE with expert bias), also at another parallel layout; a run whose layout does not fit the
ranks names the override that evaluates it."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_ext.config import from_dict
from megatron_ext.parallel import ParallelSizes
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.evaluate import evaluate_checkpoint
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

CONFIG = merge(
    TINY,
    {
        "model": {"num_layers": 4},
        "data": {"seq_length": 32},
        "train": {"steps": 12, "eval_interval": 12, "eval_steps": 2},
        "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "first_k_dense": 1},
        "routing": {"expert_bias": True, "bias_update_rate": 0.01},
        "hybrid_attention": {"enabled": True, "window": 2, "target": 0.5, "mask_learning_steps": 4},
        "looping": {
            "enabled": True,
            "first_selection_step": 2,
            "window": 2,
            "top_k_layers": 2,
            "max_selected_layers": 2,
            "num_keep_heads": 1,
        },
    },
)


def train(run_dir):
    Trainer(from_dict(RunConfig, copy.deepcopy(CONFIG)), Path(run_dir), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")[-1]


def evaluate(run_dir, tensor=1, structure=True):
    import megatron_ext.training.capabilities as capabilities

    cfg = from_dict(RunConfig, {**copy.deepcopy(CONFIG), "parallel": {"tensor": tensor}})
    original = capabilities.restore_capabilities
    if not structure:  # the weights alone: every head full attention, no loops
        capabilities.restore_capabilities = lambda *args, **kwargs: []
    try:
        return evaluate_checkpoint(cfg, Path(run_dir), 2)
    finally:
        capabilities.restore_capabilities = original


def test_evaluation_restores_the_trained_structure(tmp_path):
    run_dir = str(tmp_path / "run")
    last = run_distributed(train, 1, None, run_dir=run_dir)[0]
    assert last["step"] == 12 and last["sgt/looped_layers"] >= 1 and last["consa/swa_fraction"] == 0.5
    logged = last["val/loss"]
    same = run_distributed(evaluate, 1, ParallelSizes(), run_dir=run_dir)[0]
    resharded = run_distributed(evaluate, 2, ParallelSizes(tp=2), run_dir=run_dir, tensor=2)
    bare = run_distributed(evaluate, 1, ParallelSizes(), run_dir=run_dir, structure=False)[0]
    print(
        f"[evaluate] logged {logged:.6f} | evaluated {same:.6f} | at TP=2 {resharded[0]:.6f} | weights alone {bare:.6f}"
    )
    assert abs(same - logged) <= 1e-6 * abs(logged)
    assert all(abs(loss - logged) <= 1e-5 * abs(logged) for loss in resharded)
    assert abs(bare - logged) > 1e-4 * abs(logged), "the structure must matter in this test"


def full_model_under_subnetwork_and_extracted(run_dir, sub_dir):
    from megatron_ext.moe.elastic import SubNetwork
    from megatron_ext.parallel import initialize_parallel_state
    from megatron_ext.run import load_config
    from megatron_ext.training.extract import extract_submodel

    data = copy.deepcopy(CONFIG)
    data["elastic"] = {"enabled": True}
    Trainer(from_dict(RunConfig, data), Path(run_dir), log=lambda line: None).run()
    initialize_parallel_state(ParallelSizes())  # the trainer tore its parallel state down
    sub = SubNetwork((0, 2, 3), (1, 3), 1)
    extract_submodel(Path(run_dir), Path(sub_dir), sub)
    cfg = load_config(Path(run_dir) / "config.yaml")
    return {
        "full": evaluate_checkpoint(cfg, Path(run_dir), 2),
        "under_sub": evaluate_checkpoint(cfg, Path(run_dir), 2, sub),
        "extracted": evaluate_checkpoint(load_config(Path(sub_dir) / "config.yaml"), Path(sub_dir), 2),
    }


def test_full_model_under_a_subnetwork_equals_the_extracted_submodel(tmp_path):
    out = run_distributed(
        full_model_under_subnetwork_and_extracted, 1, None, run_dir=str(tmp_path / "run"), sub_dir=str(tmp_path / "sub")
    )[0]
    print(
        f"[evaluate] full {out['full']:.6f} | under layers 0,2,3, experts 1,3, top-1 {out['under_sub']:.6f} | "
        f"extracted {out['extracted']:.6f}"
    )
    assert abs(out["under_sub"] - out["extracted"]) <= 1e-5 * out["extracted"]
    assert abs(out["under_sub"] - out["full"]) > 1e-3  # the sub-network is another function


def train_dense(run_dir):
    data = {key: copy.deepcopy(CONFIG[key]) for key in ("model", "data", "train", "logging")}
    data["train"].update(steps=2, eval_interval=2)
    Trainer(from_dict(RunConfig, data), Path(run_dir), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")[-1]


def test_a_layout_that_does_not_fit_one_process_evaluates_with_the_override_it_names(tmp_path):
    run_dir = tmp_path / "run"
    logged = run_distributed(train_dense, 1, None, run_dir=str(run_dir))[0]["val/loss"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["parallel"]["tensor"] = 2  # as if trained at TP=2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}  # one plain process

    def evaluate_cli(*extra):
        return subprocess.run(
            [sys.executable, "-m", "pretrain.evaluate", "--run-dir", str(run_dir), "--batches", "2", *extra],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    refused = evaluate_cli()
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1, refused.stderr
    assert "`torchrun --nproc-per-node 2 -m pretrain.evaluate" in refused.stderr
    override = refused.stderr.split("with `--set ")[1].split("`")[0]
    assert override == "parallel.tensor=1", refused.stderr
    done = evaluate_cli("--set", override)
    assert done.returncode == 0, done.stderr
    evaluated = float(done.stdout.split("validation loss ")[1].split()[0])
    assert abs(evaluated - logged) <= 1e-4 * abs(logged), (evaluated, logged)
