"""The lm-eval model over our runs (``megatron-ext``) against lm-eval's own ``hf`` model on the HF export of
the same checkpoint: the same log-likelihood per request (fp32 round-off), the same rolling
log-likelihoods and greedy generations, the same accuracy on a local task, for a dense and a layer-wise
hybrid model; the export carries the run's (bytes) tokenizer; ``pretrain.evaluate --tasks`` writes the
results into the run directory and refuses unknown tasks before loading anything."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.config import from_dict
from megatron_ext.data.preprocess import preprocess
from megatron_ext.evaluation.tasks.local_tasks import python_syntax
from megatron_ext.parallel import ParallelSizes
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from tests.configs import SMALL, merge

pytest.importorskip("lm_eval", reason="the eval extra (pip install '.[eval]') is part of the test extra")

VOCAB = 264  # the bytes tokenizer's 257 ids, rounded up
KINDS = {
    "dense": {},
    "layerwise": {
        "hybrid_attention": {
            "enabled": True,
            "method": "rule_layer",
            "granularity": "layer",
            "window": 8,
            "target": 0.67,
        }
    },
}
LIMIT = 24


def corpus(tmp_path: Path) -> str:
    """Python-like statements (the local task's kind of text), preprocessed with the bytes tokenizer."""
    rows = python_syntax(count=400, seed=7)["test"]
    lines = [row["context"] + row["choices"][row["answer"]] for row in rows]
    docs = tmp_path / "code.jsonl"
    docs.write_text("".join(json.dumps({"text": "\n".join(lines[i : i + 8])}) + "\n" for i in range(0, 400, 8)))
    preprocess([docs], tmp_path / "code", "bytes", progress=False)
    return str(tmp_path / "code")


def train_and_export(run_dir, hf_dir, cfg):
    from megatron_ext.training.hf import export_hf
    from megatron_ext.training.loop import Trainer

    Trainer(from_dict(RunConfig, cfg), Path(run_dir), log=lambda line: None).run()
    return str(export_hf(Path(run_dir), Path(hf_dir)))


def export(run_dir, hf_dir):
    from megatron_ext.training.hf import export_hf

    return str(export_hf(Path(run_dir), Path(hf_dir)))


def train(run_dir, cfg):
    from megatron_ext.training.loop import Trainer

    Trainer(from_dict(RunConfig, cfg), Path(run_dir), log=lambda line: None).run()


def requests():
    """lm-eval Instances: the local task's (context, choice) pairs, rolling texts, generations."""
    from lm_eval.api.instance import Instance

    rows = list(python_syntax(count=LIMIT // 3, seed=99)["test"])
    pairs = [(row["context"], choice) for row in rows for choice in row["choices"]]
    loglikelihood = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    texts = [row["context"] * 9 for row in rows[:3]]  # longer than max_length: several rolling windows
    rolling = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    prompts = [row["context"] for row in rows[:4]]
    until = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}
    generate = [Instance("generate_until", {}, (prompt, until), i) for i, prompt in enumerate(prompts)]
    return loglikelihood, rolling, generate


def scores(run_dir, hf_dir):
    """(ours, hf's) per request kind, and the accuracy of both on the local task."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from megatron_ext.evaluation.lm_eval_model import MegatronExtLM
    from megatron_ext.evaluation.model import EvalModel
    from megatron_ext.evaluation.tasks_runner import task_manager

    ours = MegatronExtLM(model=EvalModel.load(run_dir), batch_size=4)
    theirs = HFLM(pretrained=hf_dir, device="cpu", dtype="float32", batch_size=4, max_length=ours.max_length)
    loglikelihood, rolling, generate = requests()
    out = {}
    for name, lm in (("ours", ours), ("hf", theirs)):
        out[name] = {
            "loglikelihood": [score for score, _ in lm.loglikelihood(loglikelihood)],
            "greedy": [greedy for _, greedy in lm.loglikelihood(loglikelihood)],
            "rolling": lm.loglikelihood_rolling(rolling),
            "generate": lm.generate_until(generate),
        }
        result = lm_eval.simple_evaluate(
            model=lm, tasks=["mx_python_syntax"], limit=LIMIT, task_manager=task_manager(), bootstrap_iters=0
        )
        out[name]["acc"] = result["results"]["mx_python_syntax"]["acc,none"]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    path = corpus(root)
    out = {}
    for kind, sections in KINDS.items():
        cfg = merge(
            SMALL,
            {
                "model": {"vocab_size": VOCAB},
                "data": {"kind": "indexed", "paths": [path], "seq_length": 64, "cache_dir": str(root / "cache")},
                "train": {"micro_batch_size": 4, "global_batch_size": 8, "steps": 40, "lr": 3.0e-3, "warmup_steps": 4},
                "logging": {"tensorboard": False},
            },
            sections,
        )
        run_dir, hf_dir = root / kind / "run", root / kind / "hf"
        run_distributed(train, 1, None, run_dir=str(run_dir), cfg=cfg)
        run_distributed(export, 1, ParallelSizes(), run_dir=str(run_dir), hf_dir=str(hf_dir))
        out[kind] = (str(run_dir), str(hf_dir))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_our_lm_eval_model_scores_what_hf_scores_on_the_export(kind, runs):
    run_dir, hf_dir = runs[kind]
    assert (Path(hf_dir) / "tokenizer.json").is_file()  # the export carries the run's tokenizer
    out = run_distributed(scores, 1, ParallelSizes(), run_dir=run_dir, hf_dir=hf_dir)[0]
    ours, hf = out["ours"], out["hf"]
    diff = max(abs(a - b) for a, b in zip(ours["loglikelihood"], hf["loglikelihood"]))
    rolling = max(abs(a - b) / abs(b) for a, b in zip(ours["rolling"], hf["rolling"]))
    print(f"[lm-eval {kind}] max |loglikelihood diff| {diff:.2e}, rolling rel {rolling:.2e}, acc {ours['acc']:.3f}")
    assert diff <= 1e-4, diff
    assert rolling <= 1e-5, rolling
    assert ours["greedy"] == hf["greedy"]
    assert ours["generate"] == hf["generate"]
    assert ours["acc"] == hf["acc"]
    assert len(set(ours["loglikelihood"])) > 1  # real scores, not a constant


def test_pretrain_evaluate_writes_task_results_and_refuses_unknown_tasks(runs, capsys):
    from pretrain.evaluate import main

    run_dir = runs["dense"][0]
    assert main(["--run-dir", run_dir, "--tasks", "mx_python_syntax,no_such_task"]) == 2
    assert "no_such_task" in capsys.readouterr().err
    assert not (Path(run_dir) / "eval").exists()  # refused before any work
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.evaluate",
            "--run-dir",
            run_dir,
            "--tasks",
            "mx_python_syntax",
            "--limit",
            "9",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| mx_python_syntax | acc |" in done.stdout
    (written,) = (Path(run_dir) / "eval").glob("*/mx_python_syntax.json")
    result = json.loads(written.read_text())
    assert result["step"] == 40 and written.parent.name == "40"
    assert 0.0 <= result["metrics"]["acc,none"] <= 1.0 and result["samples"] == 9


def test_the_local_tasks_are_deterministic_and_well_formed():
    first, again = python_syntax()["test"], python_syntax()["test"]
    assert list(first) == list(again)
    for row in first:
        assert len(row["choices"]) == 3 and 0 <= row["answer"] < 3
        assert row["context"][-1].isalnum()  # no BPE merges the context's end into a choice
    assert torch.tensor([row["answer"] for row in first]).bincount().min() > 20  # shuffled answers


def train_with_tasks(run_dir, cfg):
    from megatron_ext.evaluation.during_training import training_callbacks
    from megatron_ext.training.loop import Trainer
    from megatron_ext.training.rundir import read_metrics

    config = from_dict(RunConfig, cfg)
    Trainer(config, Path(run_dir), training_callbacks(config), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def test_tasks_run_during_training_and_are_logged(tmp_path):
    """train.eval_tasks: an lm-eval task and length extrapolation every 2 steps and after the last,
    logged as eval/<task>/<metric> and written to eval/<step>/; layouts that shard the model and a
    Trainer without the callback are refused before any work."""
    from megatron_ext.config import ConfigError
    from megatron_ext.evaluation.during_training import training_callbacks
    from megatron_ext.training.loop import Trainer

    tasks = {"tasks": ["mx_python_syntax", "extrapolation"], "interval": 2, "limit": 3, "options": {"factors": "1,2"}}
    cfg = merge(
        SMALL,
        {
            "model": {"vocab_size": VOCAB},
            "data": {
                "kind": "indexed",
                "paths": [corpus(tmp_path)],
                "seq_length": 32,
                "cache_dir": str(tmp_path / "c"),
            },
            "train": {"micro_batch_size": 2, "global_batch_size": 4, "steps": 3, "eval_steps": 1, "eval_tasks": tasks},
            "logging": {"tensorboard": False},
        },
    )
    records = run_distributed(train_with_tasks, 1, None, run_dir=str(tmp_path / "run"), cfg=cfg)[0]
    evaluated = {r["step"]: r for r in records if "eval/mx_python_syntax/acc" in r}
    assert sorted(evaluated) == [2, 3]
    for record in evaluated.values():
        assert 0.0 <= record["eval/mx_python_syntax/acc"] <= 1.0
        assert record["eval/extrapolation/loss@2x"] > 0
    assert (tmp_path / "run" / "eval" / "2" / "mx_python_syntax.json").is_file()
    assert (tmp_path / "run" / "eval" / "3" / "extrapolation.json").is_file()

    sharded = from_dict(RunConfig, merge(cfg, {"parallel": {"tensor": 2}}))
    with pytest.raises(ConfigError, match="parallel.tensor > 1 shards it"):
        training_callbacks(sharded)
    with pytest.raises(ConfigError, match="unknown task"):
        training_callbacks(from_dict(RunConfig, merge(cfg, {"train": {"eval_tasks": {"tasks": ["nope"]}}})))
    with pytest.raises(ConfigError, match="evaluation callback"):
        Trainer(from_dict(RunConfig, cfg), tmp_path / "other")
