"""Configuration loading and validation: every error names the field, the value and the fix."""

import re

import pytest

from megatron_ext.config import ConfigError, apply_overrides, from_dict, to_dict
from megatron_ext.run import RunConfig, check_run, load_config


def problems_of(data, world_size=None, cuda=False):
    with pytest.raises(ConfigError) as info:
        cfg = from_dict(RunConfig, data)
        check_run(cfg, world_size, cuda=cuda)
    return info.value.problems


def moe_cfg(**parallel):
    return {
        "moe": {"enabled": True, "num_experts": 8, "top_k": 2},
        "parallel": dict(parallel),
        "train": {"global_batch_size": 8, "micro_batch_size": 1},
    }


def test_smoke_and_paper_configs_load_and_round_trip(tmp_path):
    for name in ("smoke", "qwen3_0p6b", "qwen3_1p7b", "consa_qwen3_0p6b", "consa_qwen3_1p7b", "ernie_moe_ablation"):
        cfg = load_config(f"configs/{name}.yaml")
        assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_unknown_keys_suggest_the_closest_name():
    (problem,) = problems_of({"model": {"num_layrs": 4}})
    assert "unknown key 'model.num_layrs'" in problem and "did you mean 'num_layers'" in problem
    (problem,) = problems_of({"trian": {}})
    assert "unknown key 'trian'" in problem and "did you mean 'train'" in problem


def test_wrong_types_name_field_value_and_expected_type():
    problems = problems_of(
        {"model": {"hidden_size": "wide"}, "train": {"lr": "fast"}, "parallel": {"sequence_parallel": 1}}
    )
    assert "model.hidden_size='wide' has the wrong type: expected int" in problems
    assert "train.lr='fast' has the wrong type: expected float" in problems
    assert "parallel.sequence_parallel=1 has the wrong type: expected bool" in problems
    (problem,) = problems_of({"model": {"normalization": "BatchNorm"}})
    assert "model.normalization='BatchNorm' is not allowed: use one of 'RMSNorm' | 'LayerNorm'" == problem


def test_zero_and_negative_sizes():
    problems = problems_of({"model": {"num_layers": 0, "hidden_size": -8}, "parallel": {"tensor": 0}})
    assert "model.num_layers=0 must be positive" in problems
    assert "model.hidden_size=-8 must be positive" in problems
    assert "parallel.tensor=0 must be positive" in problems


def test_every_problem_is_reported_at_once():
    problems = problems_of({"model": {"num_layers": 0}, "train": {"steps": -1}, "bogus": 1})
    assert len(problems) == 3


def test_world_size_must_be_tp_pp_cp_dp():
    problem, hint = problems_of({"parallel": {"tensor": 2, "pipeline": 2}, "model": {"num_layers": 4}}, world_size=6)
    assert "runs on a multiple of 4 ranks and this job has 6" in hint
    assert "world size 6 is not divisible by parallel.tensor * parallel.pipeline * parallel.context" in problem
    assert "TP*PP*CP*DP" in problem


def test_expert_parallel_must_divide_experts_and_data_parallel_ranks():
    problems = problems_of(moe_cfg(expert=3), world_size=3)
    assert any("moe.num_experts=8 is not divisible by parallel.expert=3" in p for p in problems)
    problems = problems_of(moe_cfg(expert=4), world_size=2)
    assert any(
        "parallel.expert=4 x expert_tensor=1 must divide data-parallel x context x tensor" in p for p in problems
    )
    (problem,) = problems_of({"parallel": {"expert": 2}}, world_size=2)
    assert "parallel.expert=2 needs moe.enabled: true" in problem


def test_heads_and_query_groups_must_divide_by_tp():
    problems = problems_of(
        {"model": {"num_attention_heads": 6, "num_query_groups": 3, "hidden_size": 96}, "parallel": {"tensor": 4}},
        world_size=4,
    )
    assert any("model.num_attention_heads=6 is not divisible by parallel.tensor=4" in p for p in problems)
    assert any("model.num_query_groups=3 is not divisible by parallel.tensor=4" in p for p in problems)


def test_sequence_length_must_suit_sequence_and_context_parallelism():
    (problem,) = problems_of(
        {"data": {"seq_length": 63}, "parallel": {"tensor": 2, "sequence_parallel": True}}, world_size=2
    )
    assert "data.seq_length=63 is not divisible by parallel.tensor=2" in problem
    problems = problems_of({"data": {"seq_length": 66}, "parallel": {"context": 2}}, world_size=2, cuda=True)
    assert any("data.seq_length=66 is not divisible by 2 * parallel.context = 4" in p for p in problems)


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "gpu"])
def test_context_parallelism_accepts_what_it_computes_and_names_the_rest(cuda):
    every_method = {
        "data": {"seq_length": 64},
        "parallel": {"context": 2, "tensor": 2, "sequence_parallel": True},
        "hybrid_attention": {"enabled": True, "window": 8, "mask_learning_steps": 10},
        "looping": {"enabled": True, "top_k_layers": 1},
        "model": {"num_layers": 2},
        "moe": {"enabled": True, "num_experts": 4, "top_k": 2},
    }
    check_run(from_dict(RunConfig, every_method), 4, cuda=cuda)  # accepted on CPU and GPU alike
    problems = problems_of(
        {
            "parallel": {"context": 2},
            "data": {"seq_length": 64},
            "model": {"attention_backend": "local", "attention_dropout": 0.1, "mtp_num_layers": 1},
        },
        world_size=2,
        cuda=cuda,
    )
    assert any(
        "model.attention_backend='local': Megatron's DotProductAttention has no context parallelism" in p
        for p in problems
    )
    assert any("model.attention_dropout=0.1: the context-parallel attention has no dropout" in p for p in problems)
    assert any(
        "model.mtp_num_layers=1: multi-token prediction's shifted inputs and targets cross the CP chunks" in p
        for p in problems
    )
    loza = {
        "parallel": {"context": 2},
        "data": {"seq_length": 64},
        "hybrid_attention": {
            "enabled": True,
            "method": "loza",
            "granularity": "layer",
            "window": 8,
            "sink_tokens": 4,
            "mask_learning_steps": 10,
        },
    }
    check_run(from_dict(RunConfig, loza), 2, cuda=cuda)  # sink + recent attention too
    problems = problems_of(
        {"parallel": {"context": 2, "tensor": 4, "sequence_parallel": True}, "data": {"seq_length": 12}},
        world_size=8,
        cuda=cuda,
    )
    assert any("data.seq_length=12 / parallel.context=2 is not divisible by parallel.tensor=4" in p for p in problems)


def test_batch_accounting_and_precision():
    problems = problems_of(
        {"train": {"global_batch_size": 6, "micro_batch_size": 2, "precision": "bf16"}}, world_size=2
    )
    assert any(
        "train.global_batch_size=6 is not divisible by train.micro_batch_size x data-parallel size" in p
        for p in problems
    )
    assert any("train.precision='bf16' needs a GPU" in p for p in problems)


def test_moe_with_tensor_parallelism_needs_sequence_parallelism():
    problems = problems_of(moe_cfg(tensor=2), world_size=2)
    assert any("parallel.sequence_parallel must be true for MoE" in p for p in problems)


def test_overrides_are_type_checked():
    data = apply_overrides({}, ["train.lr=1e-3", "model.num_layers=3", "parallel.sequence_parallel=true"])
    cfg = from_dict(RunConfig, data)
    assert cfg.train.lr == 1e-3 and cfg.model.num_layers == 3 and cfg.parallel.sequence_parallel is True
    with pytest.raises(ConfigError, match="model.num_layers='three' has the wrong type"):
        from_dict(RunConfig, apply_overrides({}, ["model.num_layers=three"]))
    with pytest.raises(ConfigError, match="is not of the form section.key=value"):
        apply_overrides({}, ["train.lr"])


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="config file 'configs/nope.yaml' does not exist"):
        load_config("configs/nope.yaml")


def test_config_files_that_are_empty_lists_or_repeat_a_key_are_refused(tmp_path):
    cases = {
        "empty.yaml": ("", "is empty"),
        "list.yaml": ("- model\n- train\n", "holds a list, not a mapping"),
        "twice.yaml": ("train:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' is given twice (line 3)"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(tmp_path / name)


def test_infinite_numbers_short_warmup_oversized_top_k_and_missing_validation_are_refused():
    with pytest.raises(ConfigError, match=r"train.lr=inf must be a finite number"):
        from_dict(RunConfig, {"train": {"lr": float("inf")}})
    with pytest.raises(ConfigError, match=r"warmup_steps=20 must be below steps=20"):
        from_dict(RunConfig, {"train": {"steps": 20, "warmup_steps": 20}})
    cfg = from_dict(RunConfig, {"model": {"num_layers": 2}, "looping": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"looping.top_k_layers=3 is not allowed: at most the model's 2 layers"):
        check_run(cfg, 1, cuda=False)
    cfg = from_dict(RunConfig, {"data": {"kind": "default", "split": "100,0,0"}, "train": {"eval_interval": 10}})
    with pytest.raises(ConfigError, match=r"train.eval_interval=10 needs validation documents"):
        check_run(cfg, 1, cuda=False)


def test_a_window_as_long_as_the_sequence_a_vocabulary_below_the_data_and_oversized_evaluations_are_refused(tmp_path):
    cfg = from_dict(
        RunConfig,
        {"data": {"seq_length": 64}, "hybrid_attention": {"enabled": True, "window": 64, "mask_learning_steps": 5}},
    )
    with pytest.raises(ConfigError, match=r"hybrid_attention.window=64 >= data.seq_length=64"):
        check_run(cfg, 1, cuda=False)
    cfg = from_dict(RunConfig, {"model": {"vocab_size": 1000}, "data": {"kind": "default"}})
    with pytest.raises(ConfigError, match=r"model.vocab_size=1000 is smaller than the built-in corpus's 2067 ids"):
        check_run(cfg, 1, cuda=False)
    from megatron_ext.data.preprocess import preprocess

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join('{"text": "%s"}\n' % ("word " * 50) for _ in range(100)))
    preprocess([str(docs)], str(tmp_path / "corpus"), "bytes", {}, 1, "text")
    data = {"kind": "indexed", "paths": [str(tmp_path / "corpus")], "seq_length": 32, "split": "90,10,0"}
    base = {"model": {"vocab_size": 384}, "data": data, "train": {"eval_interval": 5, "global_batch_size": 4}}
    check_run(from_dict(RunConfig, {**base, "train": {**base["train"], "eval_steps": 2}}), 1, cuda=False)
    with pytest.raises(
        ConfigError,
        match=r"train.eval_steps=1000 evaluates 128,000 tokens per evaluation, but the "
        r"validation split holds about 2,\d+ .*set train.eval_steps <= \d+",
    ):
        check_run(from_dict(RunConfig, {**base, "train": {**base["train"], "eval_steps": 1000}}), 1, cuda=False)


def test_a_layout_that_does_not_fit_the_ranks_says_how_to_run_it():
    cfg = from_dict(RunConfig, {"parallel": {"tensor": 2, "expert": 2, "expert_tensor": 1}})
    with pytest.raises(ConfigError) as err:
        check_run(cfg, 1, cuda=False)
    message = str(err.value)
    assert "runs on a multiple of 2 ranks and this job has 1" in message, message
    assert "--nproc-per-node 2" in message and "--set parallel.tensor=1" in message, message


def test_field_and_layout_problems_come_in_one_round(tmp_path):
    """With the world size known, a config refused for its fields also names its layout problems."""
    from megatron_ext.run import load_config

    path = tmp_path / "bad.yaml"
    path.write_text("model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, ffn_hidden_size: -5}\n"
                    "parallel: {tensor: 2}\n")  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_config(path, world_size=1)
    problems = err.value.problems
    assert any("ffn_hidden_size=-5" in p for p in problems)
    assert any("world size 1 is not divisible by parallel.tensor" in p for p in problems)
    with pytest.raises(ConfigError) as err:
        load_config(path)  # without a world size: the fields alone
    assert not any("world size" in p for p in err.value.problems)


MODEL_4x2 = {"num_layers": 4, "num_attention_heads": 4, "num_query_groups": 2}


@pytest.mark.parametrize(
    "hybrid, message",
    [
        (
            {"method": "rule_head", "target": 0.75},
            r"0.75 of the 2 KV heads of each layer is 1.5 SWA units.*make 2 of 2",
        ),
        ({"method": "consa", "constraint": "per_layer", "target": 0.75}, r"of the 2 KV heads of each layer .*global"),
        ({"method": "consa", "granularity": "layer", "constraint": "global", "target": 0.3}, r"of the 4 layers is 1.2"),
        ({"method": "rule_layer", "granularity": "layer", "target": 0.33}, r"of the 4 layers is 1.32"),
    ],
)
def test_a_target_that_is_not_a_whole_number_of_units_is_refused(hybrid, message):
    """Binarization rounds rho x units half to even: 0.75 of 2 KV heads would make both SWA (rho 1)."""
    section = {"enabled": True, "window": 8, **hybrid}
    if hybrid["method"] == "consa":
        section["mask_learning_steps"] = 5
    with pytest.raises(ConfigError, match=message):
        check_run(from_dict(RunConfig, {"model": MODEL_4x2, "hybrid_attention": section}), 1, cuda=False)
    whole = {**section, "target": 0.5, "constraint": "global"}  # 4 of 8 KV heads, 2 of 4 layers
    check_run(from_dict(RunConfig, {"model": MODEL_4x2, "hybrid_attention": whole}), 1, cuda=False)


def test_a_target_written_to_two_decimals_counts_as_the_whole_number():
    layers = {"enabled": True, "window": 8, "method": "rule_layer", "granularity": "layer", "target": 0.67}
    check_run(
        from_dict(RunConfig, {"model": {**MODEL_4x2, "num_layers": 3}, "hybrid_attention": layers}), 1, cuda=False
    )
