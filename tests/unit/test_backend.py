"""model.backend (local / te / auto) and train.precision: fp8: resolution, refusals before any work, and
the layer specs the TE backend builds. The TE modules themselves run only where Transformer Engine
imports (tests/integration/test_te_backend.py, on a GPU)."""

import dataclasses

import pytest

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.run import RunConfig
from megatron_ext.run import backend as backend_module
from megatron_ext.run.backend import backend_problems, resolve_backend
from megatron_ext.run.checks import check_run

BASE = {
    "model": {
        "num_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 128,
        "vocab_size": 256,
    },
    "data": {"seq_length": 64},
    "train": {"micro_batch_size": 2, "global_batch_size": 2, "steps": 2},
}


def run_config(model=None, train=None, **sections):
    data = {**BASE, **sections}
    data["model"] = {**BASE["model"], **(model or {})}
    data["train"] = {**BASE["train"], **(train or {})}
    return from_dict(RunConfig, data)


@pytest.fixture
def te_imports(monkeypatch):
    """Transformer Engine imports (as on a GPU image that has it)."""
    monkeypatch.setattr(backend_module, "te_import_error", lambda: None)


@pytest.fixture
def te_missing(monkeypatch):
    monkeypatch.setattr(backend_module, "te_import_error", lambda: "ModuleNotFoundError: No module named 'te'")


def test_auto_is_te_only_on_a_gpu_with_transformer_engine_and_nothing_that_needs_local(te_imports):
    cfg = run_config()
    assert resolve_backend(cfg, cuda=False) == "local"
    assert resolve_backend(cfg, cuda=True) == "te"
    looping = run_config(looping={"enabled": True})
    assert resolve_backend(looping, cuda=True) == "local"
    context = run_config(parallel={"context": 2})
    assert resolve_backend(context, cuda=True) == "local"
    assert resolve_backend(run_config(model={"backend": "local"}), cuda=True) == "local"


def test_auto_without_transformer_engine_is_local(te_missing):
    assert resolve_backend(run_config(), cuda=True) == "local"


def problems(cfg, cuda, world=1, **kw):
    with pytest.raises(ConfigError) as err:
        check_run(cfg, world, cuda=cuda, **kw)
    return "\n".join(err.value.problems)


def test_te_is_refused_on_cpu_and_where_transformer_engine_does_not_import(te_missing):
    text = problems(run_config(model={"backend": "te"}), cuda=False)
    assert "model.backend='te' needs a GPU" in text
    text = problems(run_config(model={"backend": "te"}), cuda=True)
    assert "Transformer Engine does not import (ModuleNotFoundError" in text and "pip install" in text
    # A plan for the GPU nodes does not look for Transformer Engine on this machine.
    assert backend_problems(run_config(model={"backend": "te"}), cuda=True, te_installed=True) == []


def test_te_is_refused_with_what_needs_the_local_modules(te_imports):
    text = problems(run_config(model={"backend": "te"}, looping={"enabled": True}), cuda=True)
    assert "model.backend='te' with looping.enabled" in text
    cfg = run_config(model={"backend": "te"}, parallel={"context": 2}, data={"seq_length": 64})
    text = problems(cfg, cuda=True, world=2)
    assert "model.backend='te' with parallel.context=2" in text


def test_fp8_needs_a_gpu_the_te_backend_and_dimensions_divisible_by_16(te_imports):
    assert "train.precision='fp8' needs a GPU" in problems(run_config(train={"precision": "fp8"}), cuda=False)
    text = problems(run_config(model={"backend": "local"}, train={"precision": "fp8"}), cuda=True)
    assert "needs model.backend 'te'" in text
    odd = run_config(model={"backend": "te", "ffn_hidden_size": 120}, train={"precision": "fp8"})
    assert "model.ffn_hidden_size=120 is not" in problems(odd, cuda=True)
    check_run(run_config(model={"backend": "te"}, train={"precision": "fp8"}), 1, cuda=True)  # accepted
    check_run(run_config(train={"precision": "fp8"}), 1, cuda=True)  # auto resolves to te here


def test_fp8_with_auto_where_transformer_engine_is_missing_says_why(te_missing):
    text = problems(run_config(train={"precision": "fp8"}), cuda=True)
    assert "needs model.backend 'te' (here the backend is local (ModuleNotFoundError" in text


def test_fp8_sets_transformer_engine_fp8_and_bf16_weights():
    import torch

    from megatron_ext.run.builder import params_dtype

    cfg = run_config(train={"precision": "fp8"})
    assert backend_module.fp8_config(cfg) == dict(
        fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1024, fp8_amax_compute_algo="max"
    )
    assert params_dtype(cfg, cuda=True) == torch.bfloat16
    assert backend_module.fp8_config(run_config(train={"precision": "bf16"})) == {}


def test_te_layer_specs_fuse_norms_keep_local_checkpoint_names_and_group_the_experts():
    """The specs a TE model is built from (structure only: without Transformer Engine the TE classes are
    Megatron's placeholders, so this checks which module goes where, not what it computes)."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_ext.models.layer_spec import block_norm
    from megatron_ext.run.builder import layer_specs

    cfg = run_config(
        model={"backend": "te", "qk_layernorm": True},
        moe={"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "first_k_dense": 1},
        hybrid_attention={"enabled": True, "window": 16, "mask_learning_steps": 2},
    )
    provider = TESpecProvider()
    specs = layer_specs(cfg)
    dense, moe = specs[0].submodules, specs[1].submodules
    for layer in (dense, moe):
        attn = layer.self_attention.submodules
        assert layer.input_layernorm is IdentityOp and attn.linear_qkv is TELayerNormColumnParallelLinear
        assert attn.linear_proj is TERowParallelLinear and attn.q_layernorm is provider.layer_norm()
        assert attn.core_attention.keywords == {"window": 16, "sink": 0, "backend": "te"}  # the hybrid core, on TE
        assert layer.sharded_state_dict_keys_map == {
            "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
            "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
        }
    assert dense.pre_mlp_layernorm is IdentityOp  # fused into linear_fc1
    assert dense.mlp.submodules.linear_fc1 is TELayerNormColumnParallelLinear
    assert moe.pre_mlp_layernorm is provider.layer_norm()  # the router reads normed input
    assert moe.mlp.submodules.experts.module is provider.grouped_mlp_modules(True, False)[0]
    assert block_norm("te") is provider.layer_norm()
    # Without hybrid attention the full-attention layers take TE's own attention.
    plain = layer_specs(run_config(model={"backend": "te"}))
    assert plain[0].submodules.self_attention.submodules.core_attention is TEDotProductAttention
    # The local backend is untouched by all this.
    local = layer_specs(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend="local")))
    assert local[0].submodules.input_layernorm is not IdentityOp and not local[0].submodules.sharded_state_dict_keys_map


def test_fp8_checks_the_expert_sizes_too(te_imports):
    moe = {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 40}
    text = problems(run_config(model={"backend": "te"}, train={"precision": "fp8"}, moe=moe), cuda=True)
    assert "moe.expert_ffn_hidden_size=40 is not" in text
    check_run(
        run_config(model={"backend": "te"}, train={"precision": "fp8"}, moe={**moe, "expert_ffn_hidden_size": 48}),
        1,
        cuda=True,
    )
