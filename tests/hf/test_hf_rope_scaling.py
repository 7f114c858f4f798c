"""RoPE scaling (``model.rope_scaling``): HF models with linear, YaRN and Llama 3.1 scaling import
with their logits at TP = 1 and 2, beyond ``original_max_position_embeddings``; the scaling changes
the logits (so the parity can fail); export writes the same ``rope_parameters`` back; per-token
position ids and cached decoding rotate with the scaled frequencies and YaRN's attention factor."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.config.sections import ModelConfig, RopeScalingConfig
from megatron_ext.parallel import ParallelSizes
from megatron_ext.run.hf import sections_from_hf
from megatron_ext.testing.distributed import run_distributed
from tests.hf.models import COMMON, hf_logits, rel_diff

TOLERANCE = 1e-5  # fp32, relative to the largest logit, as tests/hf/test_hf_roundtrip.py
ORIGINAL = 32  # original_max_position_embeddings of every case: the test sequences are 2.5x longer
LENGTH = 80
SCALINGS = {
    "linear": ("llama", {"rope_type": "linear", "factor": 4.0}),
    "yarn": ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    "llama3": (
        "llama",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
        },
    ),
    # YaRN's other attention-factor forms: given outright (with its other keys), and DeepSeek's ratio
    "yarn_attention_factor": (
        "llama",
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "attention_factor": 1.3,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "truncate": False,
        },
    ),
    "yarn_mscale": (
        "qwen3",
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
    ),
}
BOTH_TP = ("linear", "yarn", "llama3")


def _build_hf(kind: str, rope_parameters, out: Path, seed: int = 0) -> Path:
    """A tiny random Llama or Qwen3 with ``rope_parameters`` (every weight random, norms too)."""
    import transformers as tf

    torch.manual_seed(seed)
    params = {"rope_theta": 10000.0, **rope_parameters}
    shape = dict(COMMON, head_dim=16, intermediate_size=96, rope_parameters=params)
    config = tf.LlamaConfig(**shape) if kind == "llama" else tf.Qwen3Config(**shape)
    model = (tf.LlamaForCausalLM if kind == "llama" else tf.Qwen3ForCausalLM)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(out)
    return out


def _unscaled_copy(hf_dir: Path, out: Path) -> Path:
    """The same weights with plain RoPE."""
    shutil.copytree(hf_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    config.pop("rope_scaling", None)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _import(hf_dir, output):
    from megatron_ext.training.hf import import_hf

    return str(import_hf(Path(hf_dir), Path(output)))


def _export(run_dir, output):
    from megatron_ext.training.hf import export_hf

    return str(export_hf(Path(run_dir), Path(output)))


def _load(run_dir: str, tp: int, reset_position_ids: bool = False):
    from megatron_ext.run import load_config
    from megatron_ext.training.evaluate import load_trained

    cfg = load_config(Path(run_dir) / "config.yaml")
    cfg.parallel.tensor = tp
    cfg.parallel.sequence_parallel = tp > 1
    cfg.data.reset_position_ids = reset_position_ids
    (model,), _, _ = load_trained(cfg, Path(run_dir))
    return cfg, model.eval()


def _logits(run_dir: str, tokens: torch.Tensor, tp: int, positions=None) -> torch.Tensor:
    """Rank body: the logits of ``run_dir`` at TP = ``tp`` (per-token ``positions`` when given)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    cfg, model = _load(run_dir, tp, reset_position_ids=positions is not None)
    if positions is None:
        positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, positions, attention_mask=None))
    return logits[..., : cfg.model.vocab_size]


def _tokens(seed=0, batch=2, length=LENGTH):
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """{case: (HF dir, the same weights without scaling, run dir)}."""
    out = {}
    for case, (kind, params) in SCALINGS.items():
        root = tmp_path_factory.mktemp(case)
        hf_dir = _build_hf(kind, params, root / "hf")
        run_distributed(_import, 1, ParallelSizes(), hf_dir=str(hf_dir), output=str(root / "run"))
        out[case] = (hf_dir, _unscaled_copy(hf_dir, root / "hf_unscaled"), root / "run")
    return out


@pytest.mark.parametrize("case", sorted(SCALINGS))
def test_scaled_rope_imports_with_the_hf_logits(case, imported):
    hf_dir, unscaled_dir, run_dir = imported[case]
    tokens = _tokens()
    ref, unscaled = hf_logits(hf_dir, tokens), hf_logits(unscaled_dir, tokens)
    tp1 = run_distributed(_logits, 1, ParallelSizes(), run_dir=str(run_dir), tokens=tokens, tp=1)[0]
    tp2 = (
        run_distributed(_logits, 2, ParallelSizes(tp=2), run_dir=str(run_dir), tokens=tokens, tp=2)[0]
        if case in BOTH_TP
        else None
    )
    print(
        f"[rope scaling {case}] max |logit diff| / max |logit| at length {LENGTH}: TP=1 {rel_diff(tp1, ref):.2e}, "
        f"TP=2 {'-' if tp2 is None else f'{rel_diff(tp2, ref):.2e}'}; vs unscaled RoPE {rel_diff(tp1, unscaled):.2e}"
    )
    assert rel_diff(tp1, ref) <= TOLERANCE
    assert tp2 is None or rel_diff(tp2, ref) <= TOLERANCE
    assert rel_diff(tp1, unscaled) > 100 * TOLERANCE  # the scaling matters at this length


@pytest.mark.parametrize("case", BOTH_TP)
def test_export_writes_the_rope_parameters_back(case, imported, tmp_path):
    hf_dir, _, run_dir = imported[case]
    back = Path(run_distributed(_export, 1, ParallelSizes(), run_dir=str(run_dir), output=str(tmp_path / "hf"))[0])
    before, after = (json.loads((d / "config.json").read_text()) for d in (hf_dir, back))
    assert after["rope_parameters"] == before["rope_parameters"]
    assert after["rope_scaling"] == {k: v for k, v in before["rope_parameters"].items() if k != "rope_theta"}
    tokens = _tokens(seed=3)
    assert torch.equal(hf_logits(back, tokens), hf_logits(hf_dir, tokens))


def test_per_token_position_ids_rotate_with_yarn_as_hf_does(imported):
    """Positions that restart (two documents, no document mask) under ``data.reset_position_ids``:
    the per-token rotation (:func:`~megatron_ext.models.rope.rotate_by_position_ids`) of a YaRN model
    equals transformers given the same ``position_ids``."""
    from transformers import AutoModelForCausalLM

    hf_dir, _, run_dir = imported["yarn"]
    tokens = _tokens(seed=4)
    positions = torch.cat([torch.arange(50), torch.arange(LENGTH - 50)]).expand(2, -1)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens, position_ids=positions).logits
    ours = run_distributed(_logits, 1, ParallelSizes(), run_dir=str(run_dir), tokens=tokens, tp=1, positions=positions)
    plain = hf_logits(hf_dir, tokens)
    print(f"[rope scaling yarn, restarting positions] max |logit diff| / max |logit|: {rel_diff(ours[0], ref):.2e}")
    assert rel_diff(ours[0], ref) <= TOLERANCE and rel_diff(ours[0], plain) > 100 * TOLERANCE


def _decode(run_dir: str, prompt_length: int = 6, new_tokens: int = 60):
    """Rank body: cached greedy decoding's logits at every step, and the full forward's."""
    from megatron_ext.inference.decode import Decoder

    cfg, model = _load(run_dir, 1)
    prompt = _tokens(seed=5, length=prompt_length)
    decoder = Decoder(model)
    caches = decoder.new_cache(2, prompt_length + new_tokens)
    logits = [decoder.prefill(prompt, caches)[:, -1]]
    tokens = [logits[-1].argmax(-1)]
    for i in range(new_tokens - 1):
        logits.append(decoder.step(tokens[-1], prompt_length + i, caches))
        tokens.append(logits[-1].argmax(-1))
    sequence = torch.cat([prompt, torch.stack(tokens, dim=1)], dim=1)
    with torch.no_grad():
        full = model(sequence, torch.arange(sequence.shape[1]).expand(2, -1), attention_mask=None)
    vocab = cfg.model.vocab_size
    return torch.stack(logits, dim=1)[..., :vocab], full[:, prompt_length - 1 : -1, :vocab]


@pytest.mark.parametrize("case", BOTH_TP)
def test_cached_decoding_uses_the_scaled_rope(case, imported):
    _, _, run_dir = imported[case]
    cached, full = run_distributed(_decode, 1, ParallelSizes(), run_dir=str(run_dir))[0]
    print(f"[rope scaling {case}, cached decoding to length 66] vs full forward: {rel_diff(cached, full):.2e}")
    assert rel_diff(cached, full) <= TOLERANCE


def _train(run_dir, overrides):
    from megatron_ext.run import RunConfig
    from megatron_ext.training.loop import Trainer
    from tests.configs import SMALL, merge

    run = {
        "model": {"kv_channels": 16, "vocab_size": 300, "max_position_embeddings": 64},
        "data": {"seq_length": 64},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "steps": 3, "lr": 1.0e-2},
        "checkpoint": {"save_at_end": True},
        "logging": {"tensorboard": False},
    }
    Trainer(from_dict(RunConfig, merge(merge(SMALL, run), overrides)), Path(run_dir), log=lambda line: None).run()


def test_a_model_trained_with_yarn_at_tp2_exports_and_transformers_computes_its_logits(tmp_path):
    """Training at 4x the original length with YaRN (TP = 2, sequence parallel), export, load in
    transformers with no code of ours: the same logits."""
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    run_dir = tmp_path / "run"
    run_distributed(
        _train,
        2,
        None,
        run_dir=str(run_dir),
        overrides={"model": {"rope_scaling": yarn}, "parallel": {"tensor": 2, "sequence_parallel": True}},
    )
    out = Path(run_distributed(_export, 1, ParallelSizes(), run_dir=str(run_dir), output=str(tmp_path / "hf"))[0])
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
    tokens = _tokens(seed=6, length=64)
    ref = hf_logits(out, tokens)
    ours = run_distributed(_logits, 2, ParallelSizes(tp=2), run_dir=str(run_dir), tokens=tokens, tp=2)[0]
    print(f"[rope scaling yarn, trained at TP=2, exported] max |logit diff| / max |logit|: {rel_diff(ours, ref):.2e}")
    assert rel_diff(ours, ref) <= TOLERANCE


# -- config and HF config mapping, no model --------------------------------------------------------------
HF = {**COMMON, "model_type": "llama", "intermediate_size": 96, "head_dim": 16, "hidden_act": "silu"}


@pytest.mark.parametrize(
    "hf_rope, ours",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, {"type": "linear", "factor": 2.0}),
        (  # transformers 4: rope_scaling wins over rope_parameters; original length from max_position_embeddings
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": {"rope_type": "default"}},
            {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32}},
            {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        ),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, None),
    ],
)
def test_hf_rope_keys_map_to_model_rope_scaling(hf_rope, ours, tmp_path):
    problems = []
    model = sections_from_hf({**HF, **hf_rope}, tmp_path, problems)["model"]
    assert problems == [] and model.get("rope_scaling") == ours
    if ours is not None:
        assert from_dict(ModelConfig, model).rope_scaling == RopeScalingConfig(**ours)


@pytest.mark.parametrize(
    "hf_rope, problem",
    [
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is refused"),
        ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "'longrope' has no equivalent"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}}, "partial_rot"),
    ],
)
def test_hf_rope_types_without_an_equivalent_are_refused(hf_rope, problem, tmp_path):
    problems = []
    sections_from_hf({**HF, **hf_rope}, tmp_path, problems)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    "scaling, problem",
    [
        ({"type": "longrope", "factor": 2.0}, "rope_scaling.type='longrope' has the wrong type"),
        ({"type": "dynamic", "factor": 2.0}, "type='dynamic' is refused"),
        ({"type": "yarn", "original_max_position_embeddings": 32}, "factor is required for type='yarn'"),
        ({"type": "linear", "factor": 2.0, "beta_fast": 8.0}, "beta_fast=8.0: type='linear' does not take it"),
        ({"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}, "low_freq_factor is required"),
        ({"type": "linear", "factor": 0.5}, "factor=0.5 must be a finite number >= 1"),
        (
            {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 32, "attention_factor": 1.2},
            "with factor=1",
        ),
    ],
)
def test_rope_scaling_is_validated_with_the_field_named(scaling, problem):
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, {"rope_scaling": scaling})
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_rope_scaling_needs_rope():
    with pytest.raises(ConfigError, match="rope_scaling needs position_embedding: rope"):
        from_dict(
            ModelConfig, {"position_embedding": "learned_absolute", "rope_scaling": {"type": "linear", "factor": 2.0}}
        )


# -- the context-extension recipe --------------------------------------------------------------------------
RECIPE = "configs/qwen3_0p6b_yarn_32k.yaml"


def _recipe_rope(config_path: str):
    """Rank body: the recipe's model on the meta device: its rotary class and attention RoPE factor."""
    from megatron_ext.compat.layers import rope_mscale
    from megatron_ext.run import load_config
    from megatron_ext.run.builder import build_on_meta

    model = build_on_meta(load_config(config_path))
    return type(model.rotary_pos_emb).__name__, rope_mscale(model.config)


def test_the_context_extension_recipe_loads_plans_and_builds_with_yarn():
    import math
    import subprocess
    import sys

    from megatron_ext.config import to_dict
    from megatron_ext.run import RunConfig, load_config

    cfg, base = load_config(RECIPE), load_config("configs/qwen3_0p6b.yaml")
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    assert (
        cfg.data.seq_length == 4 * base.data.seq_length == 4 * cfg.model.rope_scaling.original_max_position_embeddings
    )

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    counts = [json.loads(run("pretrain.params", "--config", c, "--json")) for c in (RECIPE, "configs/qwen3_0p6b.yaml")]
    assert counts[0] == counts[1]  # the base run's weights, unchanged in shape
    plan = run(
        "pretrain.plan", "--config", RECIPE, "--nodes", "1", "--gpus-per-node", "8", "--summary",
        "--set", "train.init_from=null",
    )  # fmt: skip
    assert "CP 2" in plan
    rotary, mscale = run_distributed(_recipe_rope, 1, ParallelSizes(), config_path=RECIPE)[0]
    assert rotary == "YarnRotaryEmbedding" and mscale == 0.1 * math.log(4.0) + 1.0


@pytest.mark.parametrize(
    "yarn",
    [
        {},
        {"attention_factor": 1.3},
        {"mscale": 1.0, "mscale_all_dim": 0.5},
        {"mscale": 0.707, "mscale_all_dim": 0.0},  # HF ignores a lone mscale
        {"mscale": 0.8, "mscale_all_dim": 0.9, "attention_factor": 0.9},  # a given attention_factor wins
    ],
)
def test_megatrons_yarn_attention_factor_is_hfs(yarn):
    """The factor Megatron's attention applies (from the config :func:`configure_rope_scaling` sets)
    equals HF's rule (:func:`yarn_attention_factor`), and transformers' own value."""
    from types import SimpleNamespace

    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_ext.compat.layers import rope_mscale
    from megatron_ext.models.rope import configure_rope_scaling, yarn_attention_factor

    scaling = RopeScalingConfig(type="yarn", factor=8.0, original_max_position_embeddings=ORIGINAL, **yarn)
    config = SimpleNamespace()
    configure_rope_scaling(config, scaling)
    hf_config = LlamaConfig(
        **COMMON,
        head_dim=16,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1e4,
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            **yarn,
        },
    )
    _, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    assert yarn_attention_factor(scaling) == hf_factor
    assert rope_mscale(config) == pytest.approx(hf_factor, rel=1e-15, abs=0)
