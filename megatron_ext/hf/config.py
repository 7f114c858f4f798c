"""The model's config, both ways between a run config and a HF ``config.json``.

Core (this module): the dense decoder (Llama, or Qwen3 with QK-norm). The enabled capabilities add
what they own (:meth:`~megatron_ext.capability.Capability.hf_config` on export,
:meth:`~megatron_ext.capability.Capability.hf_sections` on import): the MoE fields (Qwen3-MoE for
softmax routing, dots1 for sigmoid + expert bias + shared experts: DeepSeek-V3's MoE with
Qwen3's attention), the sliding-window layers of a hybrid. :func:`resolve_architecture` then
picks the HF class; what no stock class represents (a KV-head-wise hybrid, a layer-wise hybrid of
a Qwen3-MoE) is exported as this project's ``hybrid_<base>`` model (``trust_remote_code``, see
:mod:`megatron_ext.hf.modeling_hybrid`). RoPE scaling (``model.rope_scaling``: linear, yarn, llama3)
is read from ``rope_parameters`` (transformers 5) or the legacy ``rope_scaling``, as transformers
reads them, and written to both. Anything that cannot be represented is refused, naming the field.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from megatron_ext.config.sections import ROPE_SCALING_KEYS

STOCK_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "dots1": "Dots1ForCausalLM",
}
"""HF model types this project maps exactly (``model_type`` -> class)."""

HYBRID_PREFIX = "hybrid_"
"""``model_type`` of this project's remote-code hybrids: ``hybrid_<base model type>``."""
HYBRID_BASES = ("qwen3", "qwen3_moe", "dots1")
HYBRID_CLASSES = {"qwen3": "HybridQwen3", "qwen3_moe": "HybridQwen3Moe", "dots1": "HybridDots1"}
REMOTE_CODE_FILE = "modeling_hybrid.py"
WINDOW_KEY = "hybrid_window"
"""Remote-code hybrids: the window W of their sliding-window KV heads (query i sees keys i-W+1..i)."""

FULL_HEADS_KEY = "full_attention_heads"
"""Remote-code hybrids: one list per layer, one 0/1 flag per KV head (1 = full attention)."""


def base_model_type(hf: Mapping[str, Any]) -> str:
    """The stock model type behind ``hf`` (a ``hybrid_<base>`` is its base)."""
    model_type = hf.get("model_type", "")
    return (
        hf.get("base_model_type", model_type[len(HYBRID_PREFIX) :])
        if model_type.startswith(HYBRID_PREFIX)
        else model_type
    )


SCALED_ROPE_KEYS = {name: keys for name, keys in ROPE_SCALING_KEYS.items() if name != "dynamic"}
"""HF RoPE types that map to ``model.rope_scaling``, with the keys of theirs that transformers reads
(others it ignores, and so does import)."""


ORIGINAL = "original_max_position_embeddings"


def rope_parameters(hf: Mapping[str, Any]) -> Dict[str, Any]:
    """The RoPE parameters as transformers 5 reads them: a legacy ``rope_scaling`` (transformers 4's
    key) replaces ``rope_parameters``, then ``rope_theta`` defaults to the top-level one."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_scaling_section(hf: Mapping[str, Any], problems: List[str]) -> Dict[str, Any] | None:
    """``model.rope_scaling`` from a HF config (None for plain RoPE), with transformers' defaults made
    explicit: ``original_max_position_embeddings`` from ``max_position_embeddings`` where absent, a
    yarn ``factor`` of None from their ratio; beta 0 means the default, as ``or 32`` / ``or 1`` does."""
    params = rope_parameters(hf)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return None
    if rope_type == "dynamic":
        problems.append(
            "rope_parameters.rope_type='dynamic' is refused: HF's dynamic NTK scaling recomputes the RoPE base "
            "at inference from the longest sequence the model instance has seen so far, which no fixed model "
            "reproduces (see model.rope_scaling)"
        )
        return None
    if rope_type not in SCALED_ROPE_KEYS:
        problems.append(
            f"rope_parameters.rope_type={rope_type!r} has no equivalent here: model.rope_scaling maps "
            f"{', '.join(SCALED_ROPE_KEYS)} (and plain RoPE, 'default')"
        )
        return None
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"rope_parameters.partial_rotary_factor={params['partial_rotary_factor']}: only 1 maps")
    section = {"type": rope_type}
    section.update({k: params[k] for k in SCALED_ROPE_KEYS[rope_type] if params.get(k) is not None})
    if ORIGINAL in SCALED_ROPE_KEYS[rope_type]:
        if hf.get(ORIGINAL) is not None:  # a top-level one wins, as in transformers
            section[ORIGINAL] = hf[ORIGINAL]
        section.setdefault(ORIGINAL, hf.get("max_position_embeddings"))
    if rope_type == "yarn":
        if section.get("factor") is None and hf.get("max_position_embeddings") and section.get(ORIGINAL):
            section["factor"] = hf["max_position_embeddings"] / section[ORIGINAL]
        for beta in ("beta_fast", "beta_slow"):
            if not section.get(beta):
                section.pop(beta, None)
    return section


def rope_theta(hf: Mapping[str, Any]) -> float:
    return float(rope_parameters(hf)["rope_theta"])


def rope_parameters_of(m) -> Dict[str, Any]:
    """HF's ``rope_parameters`` of model section ``m`` (plain or scaled RoPE)."""
    params: Dict[str, Any] = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    scaling = m.rope_scaling
    if scaling.type is not None:
        params["rope_type"] = scaling.type
        params.update(
            {k: getattr(scaling, k) for k in SCALED_ROPE_KEYS[scaling.type] if getattr(scaling, k) is not None}
        )
    return params


def model_section(hf: Mapping[str, Any], problems: List[str]) -> Dict[str, Any]:
    """Our ``model`` section from a HF config (problems appended, one per field that does not map)."""
    base = base_model_type(hf)
    if base not in STOCK_ARCHITECTURES:
        problems.append(
            f"model_type={hf.get('model_type')!r} is not supported: import maps "
            f"{', '.join(STOCK_ARCHITECTURES)} and this project's {HYBRID_PREFIX}* exports"
        )
        return {}
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU MLPs) maps to model.activation")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            problems.append(f"{name}=true: the model has no biases in its linear layers (model.add_bias_linear)")
    if hf.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp={hf['pretraining_tp']}: only 1 maps")
    theta = rope_theta(hf)
    if theta != int(theta):
        problems.append(f"rope_theta={theta}: model.rotary_base is an integer")
    heads = hf["num_attention_heads"]
    section = {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "ffn_hidden_size": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf.get("max_position_embeddings"),
        "normalization": "RMSNorm",
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "activation": "swiglu",
        "position_embedding": "rope",
        "rotary_base": int(theta),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qk_layernorm": base != "llama",
        "add_bias_linear": False,
        "init_method_std": float(hf.get("initializer_range", 0.02)),
        "attention_dropout": float(hf.get("attention_dropout", 0.0) or 0.0),
    }
    scaling = rope_scaling_section(hf, problems)
    if scaling is not None:
        section["rope_scaling"] = scaling
    return section


def dense_hf_config(cfg, dtype: str) -> tuple[Dict[str, Any], List[str]]:
    """The HF config of ``cfg``'s dense decoder (Qwen3, or Llama without QK-norm) and the problems."""
    m = cfg.model
    problems = []
    if m.normalization != "RMSNorm":
        problems.append(f"model.normalization={m.normalization!r}: the HF classes use RMSNorm")
    if m.activation != "swiglu":
        problems.append(f"model.activation={m.activation!r}: the HF classes use SwiGLU (hidden_act silu)")
    if m.position_embedding != "rope":
        problems.append(f"model.position_embedding={m.position_embedding!r}: the HF classes use RoPE")
    if m.add_bias_linear:
        problems.append(
            "model.add_bias_linear=true: biases in every linear layer have no HF class here "
            "(attention_bias covers attention only)"
        )
    heads = m.num_attention_heads
    base = "qwen3" if m.qk_layernorm else "llama"
    layers = m.num_layers
    hf: Dict[str, Any] = {
        "architectures": [STOCK_ARCHITECTURES[base]],
        "model_type": base,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": m.num_query_groups or heads,
        "head_dim": m.kv_channels or m.hidden_size // heads,
        "intermediate_size": m.ffn_hidden_size,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings or cfg.data.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "hidden_act": "silu",
        "rope_theta": float(m.rotary_base),
        "rope_parameters": rope_parameters_of(m),
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": m.attention_dropout,
        "initializer_range": m.init_method_std,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if m.rope_scaling.type is not None:  # transformers 4 reads rope_scaling (and rope_theta); 5 either
        hf["rope_scaling"] = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
    if base == "llama":
        hf.update(mlp_bias=False, pretraining_tp=1)
    else:
        hf.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=layers,
            layer_types=["full_attention"] * layers,
        )
    return hf, problems


def sliding_layers(hf: Mapping[str, Any]) -> List[bool]:
    """Which layers of a stock HF config use sliding-window attention (as the HF classes decide)."""
    layers = hf["num_hidden_layers"]
    base = base_model_type(hf)
    window = hf.get("sliding_window")
    if base in ("qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return [False] * layers
    if base == "qwen3_moe":  # one window for every layer
        return [True] * layers
    types = hf.get("layer_types")
    if types is None:
        start = hf.get("max_window_layers", layers)
        return [i >= start for i in range(layers)]
    return [t == "sliding_attention" for t in types]


def resolve_architecture(hf: Dict[str, Any], problems: List[str]) -> bool:
    """After the capabilities' additions: make ``hf`` a stock class's config where one represents
    the model, else this project's remote-code hybrid. Returns whether remote code is needed."""
    base = hf["model_type"]
    per_head = hf.get(FULL_HEADS_KEY)
    sliding = [t == "sliding_attention" for t in hf.get("layer_types", [])]
    if base == "llama" and (per_head is not None or any(sliding)):
        problems.append(
            "hybrid attention export needs model.qk_layernorm=true (Qwen3 attention): Llama has no "
            "per-layer sliding window"
        )
        return False
    if per_head is None and not (base == "qwen3_moe" and any(sliding)):
        return False
    if per_head is None:  # a layer-wise hybrid of a Qwen3-MoE: the per-head form with uniform rows
        per_head = [[0 if s else 1] * hf["num_key_value_heads"] for s in sliding]
        hf[FULL_HEADS_KEY] = per_head
    name = HYBRID_CLASSES[base]
    module = REMOTE_CODE_FILE[: -len(".py")]
    hf.update(
        model_type=HYBRID_PREFIX + base,
        base_model_type=base,
        architectures=[f"{name}ForCausalLM"],
        auto_map={"AutoConfig": f"{module}.{name}Config", "AutoModelForCausalLM": f"{module}.{name}ForCausalLM"},
        layer_types=["full_attention"] * hf["num_hidden_layers"],
        use_sliding_window=False,
        **{WINDOW_KEY: hf["sliding_window"]},
        sliding_window=None,
    )
    return True
