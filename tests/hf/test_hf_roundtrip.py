"""HF interop: imported models compute HF's logits at TP = 1 and 2; trained models exported to HF
compute ours; HF -> ours -> HF is bitwise for the weights; train.init_from takes a HF directory."""

import json
from pathlib import Path

import pytest
import torch

from megatron_ext.config import from_dict
from megatron_ext.parallel import ParallelSizes
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.configs import SMALL, merge
from tests.hf.models import build_hf, hf_logits, our_logits, rel_diff

KINDS = ("dense", "layerwise", "qwen3_moe", "dots1")
TOLERANCE = 1e-5  # fp32, relative to the largest logit


def _import(hf_dir, output, config=None):
    from megatron_ext.training.hf import import_hf

    return str(import_hf(Path(hf_dir), Path(output), None if config is None else Path(config)))


def _export(run_dir, output):
    from megatron_ext.training.hf import export_hf

    return str(export_hf(Path(run_dir), Path(output)))


def _tokens(seed=0, batch=2, length=40):
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{kind: (HF dir, run dir)}: each tiny HF model and its import."""
    out = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(kind)
        hf_dir = build_hf(kind, root / "hf")
        run_distributed(_import, 1, ParallelSizes(), hf_dir=str(hf_dir), output=str(root / "run"))
        out[kind] = (hf_dir, root / "run")
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_imported_model_computes_the_hf_logits_at_tp1_and_tp2(kind, imported):
    hf_dir, run_dir = imported[kind]
    tokens = _tokens()
    ref = hf_logits(hf_dir, tokens)
    tp1 = run_distributed(our_logits, 1, ParallelSizes(), run_dir=str(run_dir), tokens=tokens, tp=1)[0]
    tp2 = run_distributed(our_logits, 2, ParallelSizes(tp=2), run_dir=str(run_dir), tokens=tokens, tp=2)[0]
    print(
        f"[hf import {kind}] max |logit diff| / max |logit|: "
        f"TP=1 {rel_diff(tp1, ref):.2e}, TP=2 {rel_diff(tp2, ref):.2e}"
    )
    assert rel_diff(tp1, ref) <= TOLERANCE and rel_diff(tp2, ref) <= TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_hf_to_ours_to_hf_is_bitwise(kind, imported, tmp_path):
    from safetensors.torch import load_file

    from megatron_ext.training.hf import load_hf_tensors

    hf_dir, run_dir = imported[kind]
    back = Path(run_distributed(_export, 1, ParallelSizes(), run_dir=str(run_dir), output=str(tmp_path / "hf"))[0])
    source, result = load_hf_tensors(hf_dir), load_file(str(back / "model.safetensors"))
    assert sorted(source) == sorted(result)
    assert all(torch.equal(source[name], result[name]) for name in source)
    before, after = json.loads((hf_dir / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for key in (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "intermediate_size",
        "rms_norm_eps",
        "tie_word_embeddings",
        "sliding_window",
        "layer_types",
        "moe_intermediate_size",
        "num_experts_per_tok",
        "n_shared_experts",
        "first_k_dense_replace",
    ):
        if key in before and (key != "layer_types" or before.get("sliding_window")):
            assert after[key] == before[key], key


# -- trained here, exported, loaded by transformers ------------------------------------------------------
BASE = merge(
    SMALL,
    {
        "model": {"kv_channels": 24, "vocab_size": 300},  # head dimension 24, not hidden / heads = 16
        "data": {"seq_length": 32},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "steps": 3, "lr": 1.0e-2},
        "checkpoint": {"save_at_end": True},
        "logging": {"tensorboard": False},
    },
)
MOE = {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "first_k_dense": 1}
TRAINED = {
    "dense": {},
    "dense_mtp": {"model": {"mtp_num_layers": 1}},  # the MTP layer stays behind
    "moe_softmax": {"moe": {**MOE, "score_function": "softmax"}, "routing": {"expert_bias": False}},
    "moe_sigmoid_shared": {"moe": {**MOE, "shared_expert_ffn_hidden_size": 64}, "routing": {"bias_update_rate": 0.05}},
    "layerwise": {
        "hybrid_attention": {
            "enabled": True,
            "method": "rule_layer",
            "granularity": "layer",
            "window": 8,
            "target": 0.67,
        }
    },
    "kv_head": {
        "hybrid_attention": {
            "enabled": True,
            "method": "rule_head",
            "granularity": "kv_head",
            "window": 8,
            "target": 0.5,
        }
    },
    "kv_head_moe_softmax": {
        "hybrid_attention": {"enabled": True, "method": "rule_head", "window": 8, "target": 0.5},
        "moe": {**MOE, "score_function": "softmax"},
        "routing": {"expert_bias": False},
    },
}
REMOTE = {"kv_head", "kv_head_moe_softmax"}
ONE_RANK = {"dense_mtp"}  # logits through the cached decoder (see tests/hf/models.py)


def _train(run_dir, overrides):
    Trainer(from_dict(RunConfig, merge(BASE, overrides)), Path(run_dir), log=lambda line: None).run()
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


@pytest.mark.parametrize("kind", sorted(TRAINED))
def test_trained_model_exported_to_hf_computes_our_logits(kind, tmp_path):
    run_dir = tmp_path / "run"
    run_distributed(_train, 1, None, run_dir=str(run_dir), overrides=TRAINED[kind])
    out = Path(run_distributed(_export, 1, ParallelSizes(), run_dir=str(run_dir), output=str(tmp_path / "hf"))[0])
    config = json.loads((out / "config.json").read_text())
    assert ((out / "modeling_hybrid.py").is_file() and "auto_map" in config) == (kind in REMOTE)
    tokens = _tokens(seed=1, length=32)
    ref = hf_logits(out, tokens, remote=kind in REMOTE)
    tp1 = run_distributed(our_logits, 1, ParallelSizes(), run_dir=str(run_dir), tokens=tokens, tp=1)[0]
    tp2 = (
        tp1
        if kind in ONE_RANK
        else run_distributed(our_logits, 2, ParallelSizes(tp=2), run_dir=str(run_dir), tokens=tokens, tp=2)[0]
    )
    print(
        f"[hf export {kind} as {config['architectures'][0]}] max |logit diff| / max |logit|: "
        f"TP=1 {rel_diff(tp1, ref):.2e}, TP=2 {'(one rank only)' if kind in ONE_RANK else f'{rel_diff(tp2, ref):.2e}'}"
    )
    assert rel_diff(tp1, ref) <= TOLERANCE and rel_diff(tp2, ref) <= TOLERANCE


def test_init_from_a_hf_directory_equals_init_from_its_import(tmp_path, imported):
    hf_dir, run_dir = imported["dense"]
    model = {**BASE["model"], "rotary_base": 10000}
    runs = {}
    for name, source in (("hf", hf_dir), ("imported", run_dir)):
        runs[name] = run_distributed(
            _train,
            2,
            None,
            run_dir=str(tmp_path / name),
            overrides={"model": model, "parallel": {"tensor": 2}, "train": {"init_from": str(source), "steps": 2}},
        )[0]
    print(f"[hf init_from] losses from the HF directory {runs['hf']}, from its import {runs['imported']}")
    assert runs["hf"] == runs["imported"]
    assert (tmp_path / "hf" / "init_from_hf" / "run" / "config.yaml").is_file()


def _extract(run_dir, output, layers, experts, top_k):
    from megatron_ext.moe.elastic import SubNetwork
    from megatron_ext.training.extract import extract_submodel

    extract_submodel(Path(run_dir), Path(output), SubNetwork(tuple(layers), tuple(experts), top_k))


def test_an_extracted_elastic_submodel_exports_and_computes_our_logits(tmp_path):
    run_dir, sub_dir = tmp_path / "run", tmp_path / "sub"
    run_distributed(
        _train,
        1,
        None,
        run_dir=str(run_dir),
        overrides={"moe": {**MOE, "shared_expert_ffn_hidden_size": 32}, "elastic": {"enabled": True}},
    )
    run_distributed(
        _extract, 1, ParallelSizes(), run_dir=str(run_dir), output=str(sub_dir), layers=[0, 2], experts=[1, 3], top_k=1
    )
    out = Path(run_distributed(_export, 1, ParallelSizes(), run_dir=str(sub_dir), output=str(tmp_path / "hf"))[0])
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["n_routed_experts"], config["num_experts_per_tok"]) == (2, 2, 1)
    tokens = _tokens(seed=2, length=32)
    ref = hf_logits(out, tokens)
    ours = run_distributed(our_logits, 1, ParallelSizes(), run_dir=str(sub_dir), tokens=tokens, tp=1)[0]
    print(
        f"[hf export elastic sub-model: layers 0,2, experts 1,3, top-1] max |logit diff| / max |logit|: "
        f"{rel_diff(ours, ref):.2e}"
    )
    assert rel_diff(ours, ref) <= TOLERANCE


def test_weights_larger_than_a_shard_are_written_as_indexed_shards(tmp_path):
    from megatron_ext.training.hf import WEIGHTS_INDEX, load_hf_tensors, save_hf_tensors

    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(16, 16) for i in range(5)}
    save_hf_tensors(tensors, tmp_path, max_shard_bytes=2 * 16 * 16 * 4)
    assert (tmp_path / WEIGHTS_INDEX).is_file() and len(list(tmp_path.glob("*.safetensors"))) == 3
    (tmp_path / "config.json").write_text("{}")
    loaded = load_hf_tensors(tmp_path)
    assert sorted(loaded) == sorted(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
