"""HF config mapping: what cannot be represented is refused, naming the field, before any work."""

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.run import RunConfig, check_run
from megatron_ext.run.hf import sections_from_hf
from tests.configs import SMALL

QWEN3 = {
    "model_type": "qwen3",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "vocab_size": 300,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    "tie_word_embeddings": True,
}
DOTS1 = {
    **QWEN3,
    "model_type": "dots1",
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
}


def _problems(hf, tmp_path):
    problems = []
    sections = sections_from_hf(hf, tmp_path, problems)
    return sections, problems


def test_a_qwen3_config_maps_to_the_model_section(tmp_path):
    sections, problems = _problems(QWEN3, tmp_path)
    assert problems == []
    assert sections["model"]["kv_channels"] == 16 and sections["model"]["rotary_base"] == 1000000
    assert sections["model"]["qk_layernorm"] and sections["model"]["tie_embeddings"]
    assert sections["moe"] == {"enabled": False} and "hybrid_attention" not in sections


def test_a_dots1_config_maps_to_sigmoid_routing_with_bias_and_shared_experts(tmp_path):
    sections, problems = _problems(DOTS1, tmp_path)
    assert problems == []
    assert sections["moe"]["score_function"] == "sigmoid" and sections["moe"]["shared_expert_ffn_hidden_size"] == 32
    assert sections["moe"]["first_k_dense"] == 1 and sections["routing"]["expert_bias"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is refused"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4 + 0.5}}, "rope_theta=10000.5"),
    ],
)
def test_unrepresentable_hf_fields_are_refused_by_name(change, field, tmp_path):
    _, problems = _problems({**QWEN3, **change}, tmp_path)
    assert any(field in p for p in problems), problems


@pytest.mark.parametrize(
    "change, field",
    [
        ({"routed_scaling_factor": 2.5}, "routed_scaling_factor=2.5"),
        ({"n_group": 4, "topk_group": 2}, "n_group=4"),
        ({"norm_topk_prob": False}, "norm_topk_prob=false"),
    ],
)
def test_unrepresentable_moe_fields_are_refused_by_name(change, field, tmp_path):
    _, problems = _problems({**DOTS1, **change}, tmp_path)
    assert any(field in p for p in problems), problems


def test_import_refuses_a_config_that_disagrees_with_the_hf_model(tmp_path):
    from megatron_ext.training.hf import import_config

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(QWEN3))
    (tmp_path / "cfg.yaml").write_text("model:\n  hidden_size: 128\ntrain:\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"model.hidden_size: .*cfg.yaml has 128, the HF config.json gives 64"):
        import_config(hf_dir, tmp_path / "out", tmp_path / "cfg.yaml")
    (tmp_path / "ok.yaml").write_text("train:\n  steps: 5\n")
    cfg = import_config(hf_dir, tmp_path / "out", tmp_path / "ok.yaml")
    assert cfg.train.steps == 5 and cfg.model.hidden_size == 64


def test_init_from_a_hf_directory_of_another_shape_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3))
    (tmp_path / "model.safetensors").write_bytes(b"")
    cfg = from_dict(
        RunConfig,
        {
            "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 300},
            "train": {"init_from": str(tmp_path)},
        },
    )
    with pytest.raises(
        ConfigError,
        match=r"train.init_from=.*model.hidden_size: the run config has 32, the HF "
        r"config.json gives 64",
    ):
        check_run(cfg, 1, cuda=False)


# -- export refusals --------------------------------------------------------------------------------------
MODEL = {**SMALL["model"], "num_layers": 2, "vocab_size": 300}
MOE = {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32}


def _export_problems(sections, callbacks=None):
    from megatron_ext.training.hf import hf_config_of

    cfg = from_dict(RunConfig, {"model": dict(MODEL), **sections})
    with pytest.raises(ConfigError) as err:
        hf_config_of(cfg, callbacks or {}, "float32")
    return str(err.value)


STATIC = SimpleNamespace(allocation=torch.tensor([[True, False], [False, True]]))


@pytest.mark.parametrize(
    "sections, callbacks, field",
    [
        ({"looping": {"enabled": True}}, None, "looping.enabled=true: no HF modeling file runs SGT attention loops"),
        (
            {
                "moe": {**MOE, "score_function": "softmax", "shared_expert_ffn_hidden_size": 32},
                "routing": {"expert_bias": False},
            },
            None,
            "moe.shared_expert_ffn_hidden_size=32 with moe.score_function='softmax'",
        ),
        ({"moe": {**MOE, "capacity_factor": 1.5}}, None, "moe.capacity_factor=1.5"),
        (
            {"moe": {**MOE, "shared_expert_ffn_hidden_size": 48}},
            None,
            "is not a multiple of moe.expert_ffn_hidden_size=32",
        ),
        ({"moe": {**MOE, "layer_pattern": [1, 0]}}, None, "dots1 keeps dense MLPs in its first layers only"),
        (
            {
                "moe": {**MOE, "num_experts": 4},
                "routing": {"mode": "modality_isolated", "isolated_modalities": ["text", "image"]},
            },
            None,
            "routing.mode='modality_isolated'",
        ),
        (
            {
                "hybrid_attention": {
                    "enabled": True,
                    "method": "consa",
                    "mask_learning_steps": 5,
                    "constraint": "per_layer",
                }
            },
            {"hybrid_attention": SimpleNamespace(allocation=None)},
            "from before binarization",
        ),
        (
            {"hybrid_attention": {"enabled": True, "method": "rule_head", "sink_tokens": 4}},
            {"hybrid_attention": STATIC},
            "hybrid_attention.sink_tokens=4",
        ),
    ],
)
def test_unrepresentable_models_are_refused_on_export_by_name(sections, callbacks, field):
    assert field in _export_problems(sections, callbacks)


def test_models_without_qk_norm_export_as_llama_and_refuse_a_hybrid():
    from megatron_ext.training.hf import hf_config_of

    cfg = from_dict(RunConfig, {"model": {**MODEL, "qk_layernorm": False}})
    hf, remote = hf_config_of(cfg, {}, "float32")
    assert hf["model_type"] == "llama" and not remote
    assert "needs model.qk_layernorm=true" in _export_problems(
        {"model": {**MODEL, "qk_layernorm": False}, "hybrid_attention": {"enabled": True, "method": "rule_head"}},
        {"hybrid_attention": STATIC},
    )
