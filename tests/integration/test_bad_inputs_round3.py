"""The newer entry points under bad input: each refused with one message naming the file or option
and the fix, no traceback, nothing written, before any work.

* a tokenizer that cannot be one (a corrupt or foreign file, a directory without tokenizer files, a
  ``tokenizer_config.json`` without the model it names) for preprocessing, training
  (``data.tokenizer``) and generation;
* ``train.init_from`` a checkpoint that is truncated, bit-flipped, or crafted (a pickle that would
  run code, its manifest rewritten to match): refused before the run directory exists, the pickle
  never loaded;
* ``pretrain.generate`` with a prompt (and continuation) longer than the positions the model
  supports, learned or rotary;
* ``pretrain.extract`` with layers or experts out of range, repeated, empty or malformed.

The entry points' ``main`` runs in this process where the refusal comes before any process group
(a subprocess would only add an interpreter start); ``init_from`` is refused inside the job, on a
worker rank.
"""

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest
import yaml

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from tests.configs import TINY, merge

BASE = merge(
    TINY,
    {
        "name": "bad",
        "data": {"kind": "synthetic"},
        "train": {"steps": 2, "warmup_steps": 1, "eval_interval": 0},
        "checkpoint": {"save_at_end": True},
    },
)
MOE = merge(
    BASE,
    {
        "model": {"num_layers": 4},
        "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 16},
    },
)


class Payload:
    """A pickle that would run a command when loaded: it touches ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _refused(status: int, stderr: str, *needles: str) -> None:
    assert status == 2, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in stderr, stderr


def _run_dir(path: Path, config: dict) -> Path:
    """A run directory holding only ``config.yaml``: enough for every refusal below."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


# A tokenizer that is not one.


@pytest.fixture(scope="module")
def bad_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    corrupt = root / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0')  # cut short
    random_file = root / "random.bin"
    random_file.write_bytes(hashlib.sha256(b"seed").digest() * 64)  # not UTF-8, not JSON
    empty_dir = root / "empty"
    empty_dir.mkdir()
    config_only = root / "config_only"  # names a SentencePiece class, but tokenizer.model is missing
    config_only.mkdir()
    (config_only / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    return {
        "corrupt_json": (corrupt, "is not a tokenizers JSON file"),
        "random_file": (random_file, "is not a tokenizers JSON file"),
        "directory_without_tokenizer": (empty_dir, "is not a tokenizer directory"),
        "config_without_its_model": (config_only, "holds no vocabulary besides its special tokens"),
    }


TOKENIZER_CASES = ["corrupt_json", "random_file", "directory_without_tokenizer", "config_without_its_model"]


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_preprocessing_refuses_a_tokenizer_that_is_not_one(bad_tokenizers, case, tmp_path, capsys):
    from megatron_ext.data.cli import preprocess_main

    tokenizer, reason = bad_tokenizers[case]
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "the model trains"}\n')
    out = tmp_path / "out"
    status = preprocess_main(
        ["--input", str(docs), "--output-prefix", str(out / "corpus"), "--tokenizer", str(tokenizer)]
    )
    _refused(status, capsys.readouterr().err, str(tokenizer), reason)
    assert not out.exists(), "nothing written"


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_training_refuses_a_data_tokenizer_that_is_not_one_before_the_run_starts(
    bad_tokenizers, case, tmp_path, capsys
):
    from pretrain.train import main

    tokenizer, reason = bad_tokenizers[case]
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(merge(BASE, {"data": {"tokenizer": str(tokenizer)}})))
    status = main(["--config", str(config), "--run-dir", str(tmp_path / "run")])
    _refused(status, capsys.readouterr().err, f"data.tokenizer={tokenizer}", reason)
    assert not (tmp_path / "run").exists(), "nothing written"


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_generate_refuses_a_run_tokenizer_that_is_not_one(bad_tokenizers, case, tmp_path, capsys):
    from pretrain.generate import main

    tokenizer, reason = bad_tokenizers[case]
    run_dir = _run_dir(tmp_path / "run", merge(BASE, {"data": {"tokenizer": str(tokenizer)}}))
    status = main(["--run-dir", str(run_dir), "--prompt", "the model", "--max-new-tokens", "4"])
    _refused(status, capsys.readouterr().err, f"data.tokenizer={tokenizer}", str(run_dir / "config.yaml"), reason)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"], "nothing written"


# train.init_from a damaged or crafted checkpoint.


def _train(run_dir: str, init_from=None):
    """A run of ``BASE`` (from ``init_from`` when given); the ConfigError's message when it is refused."""
    from megatron_ext.training.loop import Trainer

    cfg = from_dict(RunConfig, merge(BASE, {"train": {"init_from": init_from}}))
    try:
        Trainer(cfg, Path(run_dir), log=lambda line: None).run()
    except ConfigError as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A short run with its checkpoint at step 2: the weights to start from."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    assert run_distributed(_train, 1, None, run_dir=str(run_dir)) == [None]
    return run_dir


def _damaged(source: Path, target: Path, damage: str, marker: Path) -> Path:
    """A copy of ``source`` whose checkpoint suffers ``damage``; a crafted file gets a manifest that
    matches it (the manifest is no defence against whoever can write the files)."""
    from megatron_ext.training.checkpoint import write_manifest

    shutil.copytree(source, target)
    step = target / "checkpoints" / "step_00000002"
    shard = sorted(step.glob("*.distcp"))[0]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "bit_flipped":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    else:  # crafted_common, crafted_metadata: a pickle that runs a command, with a matching manifest
        crafted = step / ("common.pt" if damage == "crafted_common" else ".metadata")
        crafted.write_bytes(pickle.dumps(Payload(marker)))
        (step / "manifest.json").unlink()
        write_manifest(step)
    return target


@pytest.mark.parametrize("damage", ["truncated", "bit_flipped", "crafted_common", "crafted_metadata"])
def test_init_from_a_damaged_or_crafted_checkpoint_is_refused_before_the_run_directory_exists(source, damage, tmp_path):
    marker = tmp_path / "code_ran"
    init_from = _damaged(source, tmp_path / "source", damage, marker)
    run_dir = tmp_path / "run"
    (message,) = run_distributed(_train, 1, None, run_dir=str(run_dir), init_from=str(init_from))
    assert message is not None, "refused"
    step = init_from / "checkpoints" / "step_00000002"
    assert f"train.init_from={init_from}" in message and "give train.init_from an intact checkpoint" in message
    named = {
        "truncated": "has 1000 bytes",
        "bit_flipped": "does not match its checksum",
        "crafted_common": f"{step / 'common.pt'} is not plain data",
        "crafted_metadata": f"{step / '.metadata'} refers to posix.system",
    }[damage]
    assert named in message, message
    assert not run_dir.exists(), "nothing written"
    assert not marker.exists(), "the crafted pickle never ran"


def test_a_run_that_resumes_does_not_read_its_init_from(source, tmp_path):
    """Once the run has a checkpoint of its own, ``train.init_from`` is not read, nor checked: a source
    damaged since (or pruned by its own run) does not stop a requeued job."""
    marker = tmp_path / "code_ran"
    init_from = _damaged(source, tmp_path / "source", "crafted_common", marker)
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)  # a run of its own that reached its last step
    assert run_distributed(_train, 1, None, run_dir=str(run_dir), init_from=str(init_from)) == [None]
    assert not marker.exists()


# pretrain.generate past the model's positions.


@pytest.mark.parametrize("position_embedding", ["rope", "learned_absolute"])
def test_generate_refuses_a_prompt_longer_than_the_positions_before_loading(position_embedding, tmp_path, capsys):
    from pretrain.generate import main

    run_dir = _run_dir(tmp_path / "run", merge(BASE, {"model": {"position_embedding": position_embedding}}))
    prompt = " ".join(str(i) for i in range(20))  # 20 tokens; the model trained at data.seq_length 16
    status = main(["--run-dir", str(run_dir), "--prompt-ids", prompt, "--max-new-tokens", "4"])
    _refused(
        status, capsys.readouterr().err, "the prompt's 20 tokens leave no room in the 16 positions", "data.seq_length"
    )
    status = main(["--run-dir", str(run_dir), "--prompt-ids", "1 2 3 4 5 6 7 8 9 10", "--max-new-tokens", "10"])
    err = capsys.readouterr().err
    _refused(status, err, "prompt + new tokens = 10 + 10 exceed the 16 positions", "--max-new-tokens <= 6")
    assert ("model.rope_scaling" in err) == (position_embedding == "rope"), err


def test_the_positions_a_model_supports():
    """``model.max_position_embeddings`` when set, else the context a yarn / llama3 scaling extends to,
    else the trained ``data.seq_length``."""
    from megatron_ext.inference.generate import supported_positions

    def positions(**model):
        return supported_positions(from_dict(RunConfig, merge(BASE, {"model": model})))[0]

    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    assert positions() == 16
    assert positions(position_embedding="learned_absolute", max_position_embeddings=24) == 24
    assert positions(rope_scaling=yarn) == 64
    assert positions(rope_scaling=yarn, max_position_embeddings=48) == 48  # HF's meaning: the extended context
    assert positions(rope_scaling={"type": "linear", "factor": 2.0}) == 16  # trained at data.seq_length with it


# pretrain.extract with a sub-network the model does not have.


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--layers", "0,99"], ["layers [0, 99]: [99] are not layers of this 4-layer model (its layers are 0-3)"]),
        (["--layers", "0,0,1"], ["layers [0, 0, 1] repeat [0]", "give each kept layer once"]),
        (["--layers", "2,1"], ["layers [2, 1] are not ascending"]),
        (["--layers", ""], ["--layers is empty"]),
        (["--layers", "3-1"], ["--layers '3-1': the range '3-1' is empty", "'1-3'"]),
        (["--layers", "first"], ["--layers 'first': 'first' is not an index or a range"]),
        (["--layers", "0,1", "--experts", "0,4"], ["experts [0, 4]", "[0, 4)"]),
        (["--layers", "0,1", "--experts", "1,1"], ["experts [1, 1]"]),
        (["--layers", "0,1", "--experts", ""], ["--experts is empty"]),
        (["--layers", "0,1", "--experts", "0-1", "--top-k", "3"], ["top-k 3 must be in [1, 2]"]),
    ],
    ids=[
        "layer_out_of_range",
        "repeated_layer",
        "descending_layers",
        "no_layers",
        "empty_range",
        "not_an_index",
        "expert_out_of_range",
        "repeated_expert",
        "no_experts",
        "top_k_above_the_kept_experts",
    ],
)
def test_extract_refuses_a_subnetwork_the_model_does_not_have(args, needles, tmp_path, capsys):
    from pretrain.extract import main

    run_dir = _run_dir(tmp_path / "run", MOE)
    output = tmp_path / "sub"
    status = main(["--run-dir", str(run_dir), "--output", str(output), *args])
    _refused(status, capsys.readouterr().err, *needles)
    assert not output.exists(), "nothing written"
