"""Long-context evaluations (``megatron_ext/evaluation/longcontext.py``).

* The generated retrieval samples are what they say: ``length`` tokens in all, the asked needle at
  its depth, the question the needle's head; an oracle that continues the needle scores 100% and a
  constant model 0%, in text (the bytes tokenizer) and in token ids; the front end's options parse.
* The issue's check, on two models of the same size trained here (800 steps) by the project's
  Trainer on token-id passkey samples of 32 tokens (indexed data written by Megatron-Core's builder):
  full attention retrieves the key at every depth of its training length (and of 4x it), while every
  layer on sliding-window attention (window 8) retrieves keys it sees and guesses (1 in 31) those
  beyond the reach of its two stacked windows.
* Length extrapolation at factor 1 is the run's validation loss (``evaluate_checkpoint``), on the
  copy task, whose loss mask covers half of each sample, for a KV-head hybrid with SGT loops and MoE
  (which also generates retrieval answers); the indexed data of the passkey runs builds at 2x and 4x.
"""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.config import from_dict
from megatron_ext.data.tokenizers import ByteTokenizer
from megatron_ext.evaluation.longcontext import (
    NATIVE_TASKS,
    default_lengths,
    extrapolation,
    make_sample,
    needle,
    passkey,
    plot_retrieval,
)
from megatron_ext.parallel import ParallelSizes
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from tests.configs import TINY, merge

VOCAB = 64
MARKER = VOCAB - 1  # the token-id samples' needle and question marker


class FakeModel:
    """What the retrieval tasks use of an EvalModel, answering from the prompt alone: ``oracle``
    continues the earliest earlier occurrence of the prompt's last ``head`` tokens (the question
    repeats its needle's head); otherwise the answer is one constant token."""

    def __init__(self, tokenizer, head: int, oracle: bool, max_length: int = 256):
        self.tokenizer, self.head, self.oracle = tokenizer, head, oracle
        self.max_length, self.vocab_size, self.step = max_length, VOCAB, 0
        self.eod = None if tokenizer is None else tokenizer.eod

    def generate(self, prompt, max_new_tokens, stop=()):
        if not self.oracle:
            return [MARKER if self.tokenizer is None else ord("x")] * max_new_tokens
        suffix = prompt[-self.head :]
        for start in range(len(prompt) - self.head):
            if prompt[start : start + self.head] == suffix:
                return prompt[start + self.head : start + self.head + max_new_tokens]
        raise AssertionError("the question's head is nowhere earlier in the prompt")


INSTRUCTION = "Somewhere in the long text below a pass key is hidden. Find it and remember it.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
# Heads shared by a question and its needle: the marker (and the name) in token ids; in bytes
# "The pass key is" (15 bytes) and "The special code for NAME is" (at least 35 bytes).
HEADS = {("passkey", False): 1, ("needle", False): 2, ("passkey", True): 15, ("needle", True): 30}


@pytest.mark.parametrize("text", [False, True], ids=["token_ids", "bytes"])
@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_samples_have_their_length_and_the_needle_at_its_depth(task, text):
    tokenizer = ByteTokenizer() if text else None
    keys = 3 if task == "needle" else 1
    for length in (400, 700, 1000) if text else (96, 160, 300):
        for depth in (0.0, 0.3, 0.5, 1.0):
            sample = make_sample(task, tokenizer, VOCAB, length, depth, f"s{length}/{depth}", keys, key_length=4)
            assert len(sample.prompt) + len(sample.answer) == length
            at = sample.needle_position
            assert sample.prompt[at : at + len(sample.needle)] == sample.needle
            assert sample.filler_before == round(depth * sample.filler_tokens)
            if text:  # the answer is the key, and the needle holds it
                assert tokenizer.decode(sample.answer) == f" {sample.key}" and sample.key.isdigit()
                assert len(sample.key) == 4 and sample.key in tokenizer.decode(sample.needle)
            else:  # the needle is [MARKER, (name,) key ids]; filler ids lie below the key ids
                assert sample.needle[0] == MARKER and sample.needle[-4:] == sample.answer
                assert sum(t < VOCAB // 2 for t in sample.prompt[:at]) == sample.filler_before
                assert sum(t < VOCAB // 2 for t in sample.prompt) == sample.filler_tokens
                assert all(VOCAB // 2 <= t < MARKER for t in sample.answer)
            if task == "passkey":  # one needle, then the rest of the filler, then the question
                assert at == len(tokenizer.encode(INSTRUCTION) if text else []) + sample.filler_before
                after = at + len(sample.needle) + sample.filler_tokens - sample.filler_before
                question = tokenizer.decode(sample.prompt[after:]) if text else sample.prompt[after:]
                assert question == (PASSKEY_QUESTION if text else [MARKER])
            elif not text:  # every name once in the needles and once more in the question
                names = [sample.prompt[i + 1] for i, t in enumerate(sample.prompt) if t == MARKER]
                assert len(names) == keys + 1 and len(set(names)) == keys and names[-1] == sample.needle[1]
    again = make_sample(task, tokenizer, VOCAB, 400, 0.5, "seed", keys, 4)
    assert again == make_sample(task, tokenizer, VOCAB, 400, 0.5, "seed", keys, 4)
    assert again != make_sample(task, tokenizer, VOCAB, 400, 0.5, "other seed", keys, 4)
    with pytest.raises(ValueError, match="too short"):
        make_sample(task, tokenizer, VOCAB, 8, 0.5, 0, keys, 4)


@pytest.mark.parametrize("text", [False, True], ids=["token_ids", "bytes"])
@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_an_oracle_scores_everything_and_a_constant_model_nothing(task, text, tmp_path):
    tokenizer = ByteTokenizer() if text else None
    run = passkey if task == "passkey" else lambda model, **kw: needle(model, keys=3, **kw)
    lengths = [400, 800] if text else [128, 256]
    settings = {"lengths": lengths, "depths": [0.0, 0.5, 1.0], "samples": 3, "key_length": 4}
    oracle = run(FakeModel(tokenizer, HEADS[task, text], oracle=True), **settings)
    constant = run(FakeModel(tokenizer, HEADS[task, text], oracle=False), **settings)
    assert oracle["accuracy"] == {str(n): {"0": 1.0, "0.5": 1.0, "1": 1.0} for n in lengths}
    assert oracle["accuracy_mean"] == 1.0 and constant["accuracy_mean"] == 0.0
    assert all(v == 0.0 for row in constant["accuracy"].values() for v in row.values())
    assert len(oracle["records"]) == 2 * 3 * 3 and all(r["correct"] for r in oracle["records"])
    assert oracle["settings"]["mode"] == ("text" if text else "token_ids")
    assert json.loads(json.dumps(oracle)) == oracle  # the front end writes results as JSON
    plot_retrieval(oracle, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 0


def test_an_answer_that_runs_on_is_wrong():
    class RunsOn(FakeModel):
        def generate(self, prompt, max_new_tokens, stop=()):
            return super().generate(prompt, max_new_tokens, stop)[:-2] + list(b"7.")

    result = passkey(RunsOn(ByteTokenizer(), 15, oracle=True), lengths=[400], depths=[0.5], samples=2, key_length=4)
    assert result["accuracy_mean"] == 0.0  # "48213" then "7": the number read is 482137


def test_front_end_options_limit_and_defaults(tmp_path):
    model = FakeModel(None, 1, oracle=True, max_length=64)
    options = {"lengths": "32,64", "depths": "0,1", "samples": "5", "seed": "3", "key_length": "3"}
    result = NATIVE_TASKS["passkey"](model, 2, {**options, "plot": str(tmp_path / "p.png")})
    assert result["settings"]["lengths"] == [32, 64] and result["settings"]["depths"] == [0.0, 1.0]
    assert result["settings"]["samples"] == 2 and result["settings"]["seed"] == 3  # limit caps samples
    assert len(result["records"]) == 2 * 2 * 2 and (tmp_path / "p.png").is_file()
    multi = NATIVE_TASKS["needle"](FakeModel(None, 2, oracle=True, max_length=64), None, {"keys": "2", "samples": "1"})
    # 2 needles of 7 ids, a question of 2 and an answer of 5: 21 ids, so the defaults from 42 on
    assert multi["settings"]["keys"] == 2 and multi["settings"]["lengths"] == [64, 128]
    assert multi["accuracy_mean"] == 1.0
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['keys'\]"):
        NATIVE_TASKS["passkey"](model, None, {"keys": "2"})
    with pytest.raises(ValueError, match="option depths='half' is not valid"):
        NATIVE_TASKS["needle"](model, None, {"depths": "half"})
    assert default_lengths(64) == [16, 32, 64, 128]
    assert default_lengths(8192) == [1024, 2048, 4096, 8192, 16384]
    assert default_lengths(1000) == [256, 512, 1000, 1024]


# Trained models: full attention against sliding-window attention only.

TRAIN_LENGTH, WINDOW, LAYERS = 32, 8, 2
RETRIEVAL = {
    "model": {"num_layers": LAYERS, "hidden_size": 64, "num_attention_heads": 8, "ffn_hidden_size": 128},
    "data": {"kind": "indexed", "seq_length": TRAIN_LENGTH, "split": "98,2,0"},
    "train": {
        "micro_batch_size": 32,
        "global_batch_size": 32,
        "steps": 800,
        "lr": 3.0e-3,
        "min_lr": 3.0e-4,
        "warmup_steps": 50,
        "weight_decay": 0.0,
        "eval_interval": 0,
    },
    "checkpoint": {"save_at_end": True},
    "logging": {"tensorboard": False},
}
ALL_SWA = {"enabled": True, "method": "rule_layer", "granularity": "layer", "window": WINDOW, "target": 1.0}


def write_passkey_documents(prefix: Path, documents: int = 4000) -> str:
    """Token-id passkey samples of ``TRAIN_LENGTH`` tokens (one key id, at a uniform depth) as the
    documents of a Megatron-LM prefix (no tokenizer: runs on it evaluate in token ids), so that every
    training sample is one passkey sample (its last label is the next document's first id)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    rng = random.Random(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(VOCAB))
    for i in range(documents):
        sample = make_sample("passkey", None, VOCAB, TRAIN_LENGTH, rng.random(), f"train/{i}", key_length=1)
        builder.add_document(np.asarray(sample.prompt + sample.answer), [TRAIN_LENGTH])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def train(run_dir, config):
    from megatron_ext.training.loop import Trainer

    Trainer(from_dict(RunConfig, config), Path(run_dir), log=lambda line: None).run()


def retrieve(run_dir):
    from megatron_ext.evaluation.model import EvalModel
    from megatron_ext.training.evaluate import evaluate_checkpoint

    model = EvalModel.load(run_dir)
    assert model.tokenizer is None
    retrieval = passkey(model, [16, 32, 64, 128], [0.0, 0.25, 0.5, 0.75, 1.0], samples=8, seed=1, key_length=1)
    extrapolated = extrapolation(model, [1, 2, 4], batches=2)  # indexed data at 2 and 4 x the length
    # More validation batches than the run's evaluations read (2): the validation set grows to them.
    extrapolated["validation"] = {n: evaluate_checkpoint(model.cfg, Path(run_dir), n) for n in (2, 6)}
    return retrieval, extrapolated


def key_distance(record) -> int:
    """Positions from the key id back to the question's marker, the query that must read it."""
    return (record["length"] - 2) - (record["needle_position"] + 1)


@pytest.fixture(scope="module")
def retrieval_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieval")
    prefix = write_passkey_documents(tmp / "passkey")
    results = {}
    for name, hybrid in (("full", None), ("swa", ALL_SWA)):
        config = merge(
            RETRIEVAL,
            {"model": {"vocab_size": VOCAB}, "data": {"paths": [prefix], "cache_dir": str(tmp / "cache")}},
            {"hybrid_attention": hybrid} if hybrid else {},
        )
        run_distributed(train, 1, None, run_dir=str(tmp / name), config=config)
        results[name], results[f"{name} extrapolation"] = run_distributed(
            retrieve, 1, ParallelSizes(), run_dir=str(tmp / name)
        )[0]
        print(f"[longcontext] {name}: passkey accuracy per length {results[name]['accuracy_by_length']}")
        print(f"[longcontext] {name}: per length and depth {results[name]['accuracy']}")
        print(f"[longcontext] {name}: extrapolation {results[f'{name} extrapolation']['results']}")
    return results


def test_full_attention_retrieves_at_its_training_length(retrieval_results):
    full = retrieval_results["full"]
    assert full["accuracy_by_length"][str(TRAIN_LENGTH)] >= 0.9, full["accuracy"]
    assert full["accuracy_by_length"]["16"] >= 0.9, full["accuracy"]


def test_extrapolation_reads_indexed_data_at_longer_lengths(retrieval_results):
    for name in ("full", "swa"):
        results = retrieval_results[f"{name} extrapolation"]["results"]
        assert [results[k]["seq_length"] for k in ("1", "2", "4")] == [32, 64, 128]
        assert [results[k]["tokens"] for k in ("1", "2", "4")] == [2 * 32 * 32, 2 * 32 * 64, 2 * 32 * 128]
        assert all(math.isfinite(r["loss"]) and r["perplexity"] == math.exp(r["loss"]) for r in results.values())
        validation = retrieval_results[f"{name} extrapolation"]["validation"]
        # Six batches are more than the run's evaluations read (IndexError before the set grew to them).
        assert math.isfinite(validation[2]) and math.isfinite(validation[6]) and validation[6] != validation[2]


def test_sliding_window_only_fails_beyond_its_window(retrieval_results):
    swa, full = retrieval_results["swa"], retrieval_results["full"]
    # Stacked windows reach LAYERS * (WINDOW - 1) positions back; beyond that the key is out of sight.
    beyond = [r for r in swa["records"] if key_distance(r) > LAYERS * (WINDOW - 1)]
    assert len(beyond) >= 60
    # A guess among the 31 key ids is right 1 time in 31.
    assert sum(r["correct"] for r in beyond) / len(beyond) <= 0.15, swa["accuracy"]
    within = [r for r in swa["records"] if key_distance(r) <= WINDOW - 1]  # the model retrieves what it sees
    assert len(within) >= 30 and sum(r["correct"] for r in within) / len(within) >= 0.9, swa["accuracy"]
    full_beyond = [
        r for r in full["records"] if key_distance(r) > LAYERS * (WINDOW - 1) and r["length"] <= TRAIN_LENGTH
    ]
    assert sum(r["correct"] for r in full_beyond) / len(full_beyond) >= 0.9
    assert swa["accuracy_by_length"][str(TRAIN_LENGTH)] < full["accuracy_by_length"][str(TRAIN_LENGTH)]


# Length extrapolation.

EXTRAPOLATION = merge(
    TINY,
    {
        "model": {"num_layers": 4},  # 128 ids: no padding of the output layer, so both normalize alike
        "data": {"kind": "copy", "seq_length": 32},
        "train": {"steps": 8, "eval_interval": 8, "eval_steps": 2},
        "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "first_k_dense": 1},
        "hybrid_attention": {"enabled": True, "window": 4, "target": 0.5, "mask_learning_steps": 4},
        "looping": {
            "enabled": True,
            "first_selection_step": 2,
            "window": 2,
            "top_k_layers": 2,
            "max_selected_layers": 2,
            "num_keep_heads": 1,
        },
        "checkpoint": {"save_at_end": True},
    },
)


def extrapolate(run_dir):
    from megatron_ext.evaluation.model import EvalModel
    from megatron_ext.run import load_config
    from megatron_ext.run.builder import unsharded
    from megatron_ext.training.evaluate import evaluate_checkpoint

    model = EvalModel.load(run_dir)
    loops = [layer.loop_depth for layer in model.model.decoder.layers if hasattr(layer, "loop_depth")]
    result = NATIVE_TASKS["extrapolation"](model, 2, {"factors": "1,2,3", "batches": "3"})
    validation = evaluate_checkpoint(unsharded(load_config(Path(run_dir) / "config.yaml")), Path(run_dir), 2)
    retrieval = passkey(model, [32, 64], [0.5], samples=1, key_length=2)  # a hybrid with loops generates
    return result, validation, loops, retrieval


def test_extrapolation_at_factor_one_is_the_validation_loss(tmp_path):
    run_distributed(train, 1, None, run_dir=str(tmp_path / "run"), config=EXTRAPOLATION)
    result, validation, loops, retrieval = run_distributed(
        extrapolate, 1, ParallelSizes(), run_dir=str(tmp_path / "run")
    )[0]
    print(f"[longcontext] extrapolation {result['results']}; validation loss {validation!r}; loops {loops}")
    one, two, three = (result["results"][k] for k in ("1", "2", "3"))
    assert result["settings"]["batches"] == 2  # limit caps batches
    assert json.loads(json.dumps(result)) == result
    assert abs(one["loss"] - validation) <= 1e-5 * validation, (one["loss"], validation)
    assert [one["seq_length"], two["seq_length"], three["seq_length"]] == [32, 64, 96]
    # The copy task's loss mask: the second half of each sample (from position h - 1), 2 batches of 4.
    assert [r["tokens"] for r in (one, two, three)] == [8 * 17, 8 * 33, 8 * 49]
    assert all(math.isfinite(r["loss"]) and r["perplexity"] > 1.0 for r in (one, two, three))
    assert retrieval["settings"]["lengths"] == [32, 64] and len(retrieval["records"]) == 2
