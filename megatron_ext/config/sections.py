"""The core sections of the run configuration, one typed dataclass each, validated on construction.

Each field's docstring says what it means; ``__post_init__`` checks what can be checked within a
section (sizes positive, choices valid) and reports every problem at once, naming fields relative to
the section (the loader adds the YAML path). The sections of a capability (hybrid attention, MoE,
looping, ...) live in the capability's own package; :func:`compose_run_config` makes the run config
out of these core sections and the capabilities' ones. Checks that need several sections or the
world size run before any process group exists (``megatron_ext.run.checks``).

This package is a leaf: it imports no other project package and no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Literal, Mapping, Optional

from megatron_ext.config.checks import Checks

MODALITIES = ("text", "image", "video", "audio")
"""Modality ids are indices into this tuple (stored as uint8 beside every token)."""

DEFAULT_SPLIT = "98,2,0"
"""``data.split`` when none is given and validation comes from ``data.paths``."""


ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}
"""The keys each RoPE scaling type takes, as HF's ``rope_parameters`` validation defines them."""
ROPE_SCALING_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ROPE_SCALING_KEYS["llama3"],
}
"""The keys each type requires (HF's validation; it fills ``original_max_position_embeddings`` from
``max_position_embeddings`` when a config leaves it out, which import does too)."""


@dataclass(kw_only=True)
class RopeScalingConfig:
    """RoPE frequency scaling for context extension: HF's ``rope_scaling`` (``rope_parameters`` in
    transformers 5), the same keys with the same meaning. ``linear``: positions divided by ``factor``
    (position interpolation, Chen et al. 2023); ``yarn``: NTK-by-parts interpolation with the attention
    temperature ``attention_factor`` (Peng et al. 2023, eqs. 17-21); ``llama3``: Llama 3.1's
    wavelength-dependent interpolation. ``dynamic`` (HF's dynamic NTK) is refused: see ``type``.
    ``type`` null (the default) is plain RoPE."""

    type: Optional[Literal["linear", "dynamic", "yarn", "llama3"]] = None
    """Scaling type; null: none (plain RoPE, no other key set). ``dynamic`` is refused: HF recomputes
    its RoPE base at inference from the longest sequence a model instance has seen so far, which is
    state of the inference run, not of the model."""
    factor: Optional[float] = None
    """Context extension factor (>= 1); required by every type."""
    original_max_position_embeddings: Optional[int] = None
    """Context length of the unscaled pretraining (yarn, llama3; required)."""
    attention_factor: Optional[float] = None
    """yarn: the scale of RoPE's cos and sin (the attention temperature); None: HF's rule from
    ``factor``, ``mscale`` and ``mscale_all_dim`` (``0.1 ln(factor) + 1`` without them)."""
    beta_fast: Optional[float] = None
    """yarn: rotations above which a dimension is extrapolated (None: 32)."""
    beta_slow: Optional[float] = None
    """yarn: rotations below which a dimension is interpolated (None: 1)."""
    mscale: Optional[float] = None
    """yarn: numerator coefficient of the attention factor (with ``mscale_all_dim``; DeepSeek's form)."""
    mscale_all_dim: Optional[float] = None
    """yarn: denominator coefficient of the attention factor (with ``mscale``)."""
    truncate: Optional[bool] = None
    """yarn: round the interpolation ramp's bounds to integer dimensions (None: true)."""
    low_freq_factor: Optional[float] = None
    """llama3: wavelengths above ``original_max_position_embeddings / low_freq_factor`` are divided by
    ``factor`` (required)."""
    high_freq_factor: Optional[float] = None
    """llama3: wavelengths below ``original_max_position_embeddings / high_freq_factor`` are kept;
    between the two the frequency is interpolated (required)."""

    def __post_init__(self):
        c = Checks(self)
        if self.type is None:
            for f in dataclasses.fields(self):
                value = getattr(self, f.name)
                c.require(value is None, f"{f.name}={value!r} needs a type: linear, yarn or llama3")
            c.done()
            return
        c.one_of("type", tuple(ROPE_SCALING_KEYS))
        c.done()
        taken = ", ".join(ROPE_SCALING_KEYS[self.type])
        c.require(
            self.type != "dynamic",
            "type='dynamic' is refused: HF's dynamic NTK scaling recomputes the RoPE base at inference from "
            "the longest sequence the model instance has seen so far (it changes with each call's length and "
            "persists between calls), so no fixed frequencies reproduce it in training or cached decoding; "
            "use 'yarn' or 'linear' for context extension",
        )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "type" and f.name not in ROPE_SCALING_KEYS[self.type]:
                c.require(value is None, f"{f.name}={value!r}: type={self.type!r} does not take it (only {taken})")
        for name in ROPE_SCALING_REQUIRED[self.type]:
            c.require(getattr(self, name) is not None, f"{name} is required for type={self.type!r}")
        c.positive(
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "low_freq_factor",
            "high_freq_factor",
        )
        c.finite("mscale", "mscale_all_dim")
        if self.factor is not None:
            c.require(
                isinstance(self.factor, (int, float)) and 1.0 <= self.factor < float("inf"),
                f"factor={self.factor!r} must be a finite number >= 1",
            )
        if self.low_freq_factor is not None and self.high_freq_factor is not None:
            c.require(
                self.high_freq_factor > self.low_freq_factor,
                f"high_freq_factor={self.high_freq_factor!r} must be larger than low_freq_factor="
                f"{self.low_freq_factor!r}",
            )
        if self.type == "yarn":
            c.require(
                (self.beta_fast or 32) > (self.beta_slow or 1),
                f"beta_fast={self.beta_fast!r} must be larger than beta_slow={self.beta_slow!r} (defaults 32 and 1)",
            )
            c.require(
                self.factor != 1 or self.attention_factor in (None, 1),
                f"attention_factor={self.attention_factor!r} with factor=1: YaRN scales nothing at factor 1 "
                "(Megatron-Core's YaRN then applies no attention factor); use factor > 1",
            )
        c.done()


@dataclass(kw_only=True)
class ModelConfig:
    """Decoder-only transformer shape (Megatron GPTModel)."""

    num_layers: int = 2
    """Number of decoder layers."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """KV heads (grouped-query attention); None means one per query head (MHA)."""
    kv_channels: Optional[int] = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    ffn_hidden_size: int = 256
    """Dense MLP inner size (per branch for SwiGLU)."""
    vocab_size: int = 256
    """Vocabulary size of the embedding and output layers (padded to a multiple of the TP size)."""
    max_position_embeddings: Optional[int] = None
    """Longest sequence the position embedding supports; None means data.seq_length."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm type."""
    norm_epsilon: float = 1e-6
    """Norm epsilon."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """MLP activation; swiglu is the gated SiLU unit."""
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    """Position encoding."""
    rotary_base: int = 10000
    """RoPE base (theta)."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE scaling for context extension (HF's ``rope_scaling`` types, see :class:`RopeScalingConfig`);
    ``type`` null (the default): plain RoPE."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    qk_layernorm: bool = False
    """Normalize queries and keys per head (Qwen3 QK-norm)."""
    add_bias_linear: bool = False
    """Biases in linear layers."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialization."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    mtp_num_layers: Optional[int] = None
    """Multi-token prediction (Megatron-Core's MTP block, DeepSeek-V3 style; ERNIE 5.0 trains with a
    next-group-of-tokens objective): this many extra layers on top of the model, layer k predicting
    the token k + 1 positions ahead; None: off. See ``train.mtp_weight``."""
    backend: Literal["auto", "local", "te"] = "auto"
    """Module backend. ``local``: Megatron-Core's local modules with this project's norms and attention
    kernels (what runs on CPU). ``te``: Transformer Engine, on GPU: fused norm + linear layers, TE's
    attention for full and sliding-window heads (``window_size``; a KV-head-mixed layer as two calls),
    MoE experts as TE grouped GEMMs; ``train.precision: fp8`` needs it. ``auto``: ``te`` on a GPU where
    Transformer Engine imports and every enabled capability supports it, else ``local``. Checkpoints
    are interchangeable: a TE model saves its fused norms under the local names."""
    attention_backend: Literal["sdpa", "local"] = "sdpa"
    """Core attention of full-attention layers: ``sdpa`` (torch's scaled_dot_product_attention:
    flash / memory-efficient kernels on GPU, a fused kernel on CPU; causal, no padding masks) or
    ``local`` (Megatron-Core's unfused DotProductAttention, as in its local layer spec). Hybrid
    attention layers use their own module."""

    def __post_init__(self):
        c = Checks(self)
        c.positive(
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "ffn_hidden_size",
            "vocab_size",
            "max_position_embeddings",
            "rotary_base",
            "norm_epsilon",
            "init_method_std",
            "mtp_num_layers",
        )
        c.require(0.0 <= self.hidden_dropout < 1.0, f"hidden_dropout={self.hidden_dropout!r} must be in [0, 1)")
        c.require(
            0.0 <= self.attention_dropout < 1.0, f"attention_dropout={self.attention_dropout!r} must be in [0, 1)"
        )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads > 0 and groups > 0:
            c.require(
                self.num_attention_heads % groups == 0,
                f"num_query_groups={groups} must divide num_attention_heads={self.num_attention_heads}",
            )
        if self.kv_channels is None and self.num_attention_heads > 0:
            c.require(
                self.hidden_size % self.num_attention_heads == 0,
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: set kv_channels explicitly or change the sizes",
            )
        if self.rope_scaling.type is not None:
            c.require(
                self.position_embedding == "rope",
                f"rope_scaling needs position_embedding: rope (got {self.position_embedding!r})",
            )
        c.done()


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model is split over ranks; data parallelism takes the remaining ranks."""

    tensor: int = 1
    """Tensor-parallel size (TP)."""
    pipeline: int = 1
    """Pipeline-parallel size (PP)."""
    virtual_pipeline: Optional[int] = None
    """Model chunks per pipeline rank for interleaved 1F1B; None disables interleaving."""
    context: int = 1
    """Context-parallel size (CP)."""
    expert: int = 1
    """Expert-parallel size (EP), carved out of the data-parallel ranks."""
    expert_tensor: Optional[int] = None
    """Expert-tensor-parallel size (ETP); None means equal to ``tensor``."""
    sequence_parallel: bool = False
    """Shard norms / dropout along the sequence over the TP group (required for MoE with TP>1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient all-reduce with backward (Megatron DDP buckets)."""

    def __post_init__(self):
        c = Checks(self)
        c.positive("tensor", "pipeline", "virtual_pipeline", "context", "expert", "expert_tensor")
        if self.virtual_pipeline is not None:
            c.require(self.pipeline > 1, f"virtual_pipeline={self.virtual_pipeline} needs pipeline > 1")
        c.done()


@dataclass(kw_only=True)
class DataConfig:
    """Where the training tokens come from."""

    kind: Literal["synthetic", "copy", "indexed", "default"] = "synthetic"
    """synthetic: a deterministic motif stream (no files); copy: a planted long-range task (the second
    half of each sample repeats the first; loss on the predictable half only); indexed: preprocessed
    prefixes (``paths``); default: the built-in multimodal corpus, built and cached on first use."""
    paths: List[str] = field(default_factory=list)
    """indexed: dataset prefixes written by ``python -m data.preprocess`` (P.bin, P.idx, ...), or by
    Megatron-LM's ``tools/preprocess_data.py`` (P.bin and P.idx alone: text, read with
    ``data.tokenizer`` when set); a blend may mix both."""
    weights: Optional[List[float]] = None
    """Blend weights of ``paths`` (normalized); None: proportional to their sizes."""
    valid_paths: List[str] = field(default_factory=list)
    """indexed: a validation set of its own (Megatron-LM's ``--valid-data-path``), prefixes of the same
    forms as ``paths`` and the same vocabulary. Set: validation reads these alone and all of ``paths``
    trains, so the validation documents stay the same whatever the training blend; empty: validation
    is the share of ``paths`` that ``split`` sets aside."""
    valid_weights: Optional[List[float]] = None
    """Blend weights of ``valid_paths`` (normalized); None: proportional to their sizes."""
    split: Optional[str] = None
    """Train / validation / test proportions of the documents of each prefix of ``paths``, e.g.
    '98,2,0'. None: '98,2,0', or with ``valid_paths`` all of ``paths`` trains (a split that gives
    validation or test a share is refused there: the validation set is ``valid_paths``)."""
    seq_length: int = 64
    """Tokens per sample."""
    seed: int = 1234
    """Seed of the sample order (and of the synthetic stream)."""
    tokenizer: Optional[str] = None
    """Tokenizer this run expects: "bytes", a tokenizer JSON file or a HF tokenizer directory (loaded
    with ``transformers.AutoTokenizer``); checked against the data's manifest, and what generation
    encodes and decodes with. None: accept the data's tokenizer."""
    eod_token: Optional[str] = None
    """End-of-document token of ``tokenizer`` (a file or directory) where it declares none or another
    is meant: the end of a Megatron-LM prefix's documents and generation's stop token. None: the
    tokenizer's eos token. Data with a manifest keeps the id recorded when it was preprocessed."""
    reset_attention_mask: bool = False
    """Document masking (Megatron-LM's ``--reset-attention-mask``): a token attends only to the earlier
    tokens of its own document (documents end with the EOD token; kinds 'indexed' and 'default').
    Every attention of the model honours it: full and sliding-window units, gated units in mask
    learning, LoZA's sinks (each document's own first tokens), SGT loops and entropy, context
    parallelism. Not with model.attention_backend 'local' or model.backend 'te'."""
    reset_position_ids: bool = False
    """Position ids restart at each document (Megatron-LM's ``--reset-position-ids``); the rotary
    embedding then rotates each token by its position in its document."""
    eod_mask_loss: bool = False
    """No loss on predicting the token after an EOD (Megatron-LM's ``--eod-mask-loss``): the first token
    of the next document, which nothing before it predicts."""
    cache_dir: str = "data/cache"
    """Where sample-index caches and the built-in corpus are kept."""
    loss_weights: Optional[Dict[str, float]] = None
    """Per-modality weight of the loss of tokens of that modality (default 1 for all); with
    ``modality_loss_rescaling`` the weight of each modality's mean loss instead."""
    modality_loss_rescaling: bool = False
    """ERNIE 5.0's per-modality loss rescaling (our reading, see ``masked_mean_loss``): each modality's
    tokens are averaged on their own and the modalities' means are combined with ``loss_weights``
    (equal without them), so that a modality with few tokens weighs as much as a frequent one. Needs
    token-level modality ids: kind 'default' or 'indexed' prefixes with a modality stream."""

    def __post_init__(self):
        c = Checks(self)
        c.positive("seq_length")
        if self.kind == "indexed":
            c.require(bool(self.paths), "paths is empty: kind 'indexed' needs at least one dataset prefix")
        for paths_name, weights_name in (("paths", "weights"), ("valid_paths", "valid_weights")):
            paths, weights = getattr(self, paths_name), getattr(self, weights_name)
            if weights is None:
                continue
            if not paths:
                c.require(False, f"{weights_name}={weights} weighs no prefixes: list them in {paths_name}")
                continue
            c.require(
                len(weights) == len(paths),
                f"{weights_name} has {len(weights)} entries for {len(paths)} {paths_name}",
            )
            c.require(all(w >= 0 for w in weights), f"{weights_name}={weights} must not be negative")
            c.require(sum(weights) > 0, f"{weights_name}={weights} must not sum to zero")
        if self.valid_paths:
            c.require(
                self.kind == "indexed",
                f"valid_paths={self.valid_paths} needs kind 'indexed' (kind={self.kind!r}): the synthetic "
                "and copy streams draw validation samples of their own, and the built-in corpus sets a share "
                "aside; preprocess the training data too and list it in paths",
            )
            shared = sorted({os.path.normpath(p) for p in self.paths} & {os.path.normpath(p) for p in self.valid_paths})
            c.require(
                not shared,
                f"valid_paths lists {shared}, which paths also lists: validation would measure documents "
                "the run trains on; give separate prefixes, or drop valid_paths and set split",
            )
        if self.split is not None:
            parts = self.split.split(",")
            ok = len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts)
            c.require(
                ok and sum(float(p) for p in parts) > 0,
                f"split={self.split!r} must be three non-negative numbers such as '98,2,0'",
            )
            c.require(
                not (ok and self.valid_paths and any(float(p) for p in parts[1:])),
                f"split={self.split!r} gives validation or test a share of paths, but valid_paths is the "
                "validation set and all of paths trains: leave split unset (or give '100,0,0')",
            )
        if self.eod_token is not None:
            c.require(
                self.tokenizer not in (None, "bytes"),
                f"eod_token={self.eod_token!r} names a token of tokenizer, which is {self.tokenizer!r}: "
                "set tokenizer to a tokenizer file or directory, or drop eod_token",
            )
            c.require(self.eod_token != "", "eod_token='' is empty: give the token that ends a document")
        documents = [
            name for name in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss") if getattr(self, name)
        ]
        c.require(
            not documents or self.kind in ("indexed", "default"),
            f"{', '.join(documents)} need documents that end with an EOD token: kind {self.kind!r} has none; "
            "use kind 'indexed' or 'default'",
        )
        c.require(
            not self.modality_loss_rescaling or self.kind in ("indexed", "default"),
            f"modality_loss_rescaling needs token-level modality ids: kind {self.kind!r} is text only; use "
            "kind 'default' (the built-in multimodal corpus) or 'indexed' prefixes written with their modality "
            "stream, or drop modality_loss_rescaling",
        )
        for name, weight in (self.loss_weights or {}).items():
            c.require(name in MODALITIES, f"loss_weights has unknown modality {name!r} (use {MODALITIES})")
            c.require(weight >= 0, f"loss_weights.{name}={weight} must be >= 0")
        c.done()

    @property
    def paths_split(self) -> Optional[str]:
        """How the documents of ``paths`` are shared out between train / validation / test: ``split``
        or its default; None with ``valid_paths`` (all of ``paths`` trains, Megatron's per-split blends)."""
        if self.valid_paths:
            return None
        return self.split if self.split is not None else DEFAULT_SPLIT


@dataclass(kw_only=True)
class EvalTasksConfig:
    """Evaluation tasks during training (``pretrain.evaluate --tasks`` on the live model): lm-eval
    tasks and the project's own (passkey, needle, extrapolation), logged as
    ``eval/<task>/<metric>`` to metrics.jsonl and TensorBoard and written to ``eval/<step>/``."""

    tasks: List[str] = field(default_factory=list)
    """Task names (empty: none)."""
    interval: int = 0
    """Run them every this many steps and after the last (0: after the last step only)."""
    limit: Optional[int] = None
    """Examples per task (None: all)."""
    options: Dict[str, str] = field(default_factory=dict)
    """Settings of the project's own tasks, as ``--option key=value`` (e.g. ``{lengths: "256,512"}``)."""

    def __post_init__(self):
        c = Checks(self)
        c.non_negative("interval")
        c.positive("limit")
        c.require(all(isinstance(t, str) and t.strip() for t in self.tasks), f"tasks={self.tasks!r} has an empty name")
        c.done()


@dataclass(kw_only=True)
class TrainConfig:
    """Optimization: batch sizes, steps, optimizer, LR schedule, precision, recompute."""

    micro_batch_size: int = 2
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks (micro-batches x DP x mbs)."""
    steps: int = 20
    """Optimizer steps of the run (with ``stages``, of all stages together)."""
    rampup_batch_size: Optional[List[int]] = None
    """Batch-size ramp-up, Megatron-LM's ``--rampup-batch-size``: ``[start, increment, samples]``. The
    global batch starts at ``start`` samples and grows by ``increment`` every ``samples / ((global_batch_size
    - start) / increment)`` consumed samples until it reaches ``global_batch_size`` after ``samples``
    samples (Megatron-Core's ``RampupBatchsizeNumMicroBatchesCalculator``); ``steps`` still counts optimizer
    steps, and the LR schedule then counts samples. None: a constant global batch."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Decay after warmup; wsd = warmup-stable-decay."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    wsd_decay_steps: Optional[int] = None
    """wsd only: length of the final decay phase."""
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """wsd only: shape of the final decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient L2 norm to this value (0 disables)."""
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU. fp8: bf16 weights and Transformer Engine FP8 GEMMs (the
    ``hybrid`` format: E4M3 forward, E5M2 gradients; delayed scaling), GPU with ``model.backend: te``."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: selective (the parts in ``recompute_modules``) or full (whole layers)."""
    recompute_modules: Optional[List[Literal["core_attn", "layernorm", "mlp", "moe", "shared_experts"]]] = None
    """selective only: what to recompute (Megatron's ``recompute_modules``: ``core_attn`` the attention
    core, ``layernorm`` both norms of a layer, ``mlp`` a dense MLP, ``moe`` an MoE layer,
    ``shared_experts`` its shared expert); None: Megatron's default, ``[core_attn]``."""
    seed: int = 1234
    """Seed of initialization and dropout."""
    init_from: Optional[str] = None
    """Start from these model weights only: a run directory (its latest checkpoint), its
    ``checkpoints/`` directory or one ``step_*`` checkpoint of this project, saved at any parallel
    layout, or a HF model directory (config.json + safetensors; its config must agree with the
    model section; converted once into ``<run-dir>/init_from_hf/``). The run starts at step 0 with a
    fresh optimizer, LR schedule, data position and capability state; a run directory that already
    has a checkpoint of its own resumes from that instead. The checkpoint's tensors must match the
    model's names and shapes."""
    mtp_weight: float = 0.1
    """Weight of the multi-token-prediction loss (mean over the MTP layers) in the gradient, with
    ``model.mtp_num_layers``; ``loss`` stays the next-token loss alone (the MTP losses are logged as
    ``mtp/loss_<k>``). ERNIE 5.0: 0.3 early, 0.1 later [paper]."""
    mtp_weight_final: Optional[float] = None
    """The MTP weight falls linearly from ``mtp_weight`` at step 1 to this at the last step; None:
    constant."""
    eval_interval: int = 0
    """Evaluate on the validation split every this many steps (0: never)."""
    eval_steps: int = 2
    """Global batches per evaluation."""
    eval_tasks: EvalTasksConfig = field(default_factory=EvalTasksConfig)
    """Downstream and long-context tasks during training (see :class:`EvalTasksConfig`)."""
    max_consecutive_nonfinite: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""
    distributed_timeout_minutes: float = 10.0
    """How long a collective waits for a peer before it fails, in every process group (the world's,
    Megatron's): a rank that never arrives ends the job after this long."""
    hang_factor: float = 20.0
    """Step watchdog (:mod:`megatron_ext.training.watchdog`): a phase of a step running longer than
    this many times its median (and at least ``hang_min_seconds``) ends the job with status 75, naming
    the rank behind and its phase and dumping the Python stacks, so that SLURM requeues it (0: off)."""
    hang_min_seconds: float = 300.0
    """The least time a phase of a step may take before the watchdog judges it (see ``hang_factor``)."""

    def __post_init__(self):
        c = Checks(self)
        c.positive(
            "micro_batch_size",
            "global_batch_size",
            "steps",
            "lr",
            "eval_steps",
            "max_consecutive_nonfinite",
            "distributed_timeout_minutes",
            "hang_min_seconds",
            "wsd_decay_steps",
            "adam_eps",
        )
        c.non_negative(
            "min_lr",
            "warmup_steps",
            "weight_decay",
            "clip_grad",
            "eval_interval",
            "mtp_weight",
            "mtp_weight_final",
            "hang_factor",
        )
        if self.lr > 0:
            c.require(self.min_lr <= self.lr, f"min_lr={self.min_lr} must not exceed lr={self.lr}")
        c.require(
            0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0,
            f"adam_beta1/adam_beta2=({self.adam_beta1}, {self.adam_beta2}) must be in [0, 1)",
        )
        if self.steps > 0 and self.warmup_steps > 0:
            c.require(
                self.warmup_steps < self.steps,
                f"warmup_steps={self.warmup_steps} must be below steps={self.steps} (the schedule needs "
                "at least one step after warmup)",
            )
        c.require(
            self.recompute_modules is None or self.recompute == "selective",
            f"recompute_modules={self.recompute_modules} needs recompute='selective' (got {self.recompute!r})",
        )
        c.require(
            self.recompute_modules is None or len(self.recompute_modules) > 0,
            "recompute_modules=[] recomputes nothing: list modules or use recompute='none'",
        )
        if self.lr_schedule == "wsd":
            c.require(self.wsd_decay_steps is not None, "wsd_decay_steps must be set when lr_schedule='wsd'")
        if self.rampup_batch_size is not None:
            ramp = self.rampup_batch_size
            c.require(
                len(ramp) == 3 and all(isinstance(v, int) and v > 0 for v in ramp),
                f"rampup_batch_size={ramp} must be three positive integers [start, increment, samples]",
            )
            if len(ramp) == 3 and all(isinstance(v, int) and v > 0 for v in ramp):
                start, increment, _ = ramp
                c.require(
                    start < self.global_batch_size,
                    f"rampup_batch_size={ramp}: start={start} must be below global_batch_size="
                    f"{self.global_batch_size} (the batch it ramps up to); drop rampup_batch_size for a constant batch",
                )
                c.require(
                    (self.global_batch_size - start) % increment == 0,
                    f"rampup_batch_size={ramp}: global_batch_size - start = {self.global_batch_size - start} is not "
                    f"divisible by increment={increment}",
                )
        c.done()


@dataclass(kw_only=True)
class CheckpointConfig:
    """When and how checkpoints are written (always under <run-dir>/checkpoints)."""

    save_interval: int = 0
    """Save every this many steps (0: only at the end and on SIGTERM / SIGUSR1)."""
    keep_last: int = 2
    """Complete checkpoints to keep; older ones are deleted after a new one is published."""
    save_at_end: bool = True
    """Save when the run finishes."""
    resume: bool = True
    """Resume from the latest checkpoint of the run directory if there is one."""
    load_optimizer: bool = True
    """Restore optimizer, scheduler and RNG state (False: weights only, e.g. after changing layout)."""
    async_save: bool = False
    """Write checkpoints in a background process while training goes on (Megatron's asynchronous
    dist_checkpointing save); each is published (manifest, ``latest``) once every rank's writer is
    done, and the run's end waits for it. Costs host memory for a copy of what changes meanwhile."""

    def __post_init__(self):
        c = Checks(self)
        c.non_negative("save_interval")
        c.positive("keep_last")
        c.done()


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases logging (the ``wandb`` extra: ``pip install .[wandb]``): every scalar of
    metrics.jsonl (list metrics one scalar per element, as in TensorBoard), the resolved config as
    the run config, the run directory's plots as images. Files under ``<run-dir>/wandb/``; a resumed
    run continues the same W&B run."""

    project: str = "megatron-ext"
    """W&B project."""
    entity: Optional[str] = None
    """W&B team or user; None: the account's default."""
    name: Optional[str] = None
    """Run name shown in W&B; None: the config's ``name``."""
    mode: Literal["online", "offline", "disabled"] = "disabled"
    """online: stream to the server (needs ``wandb login``); offline: files only (``wandb sync`` them
    later); disabled: no W&B at all (the default)."""
    tags: List[str] = field(default_factory=list)
    """Tags of the W&B run."""

    def __post_init__(self):
        c = Checks(self)
        c.require(bool(self.project.strip()), f"project={self.project!r} is empty: name the W&B project")
        c.require(all(t.strip() for t in self.tags), f"tags={self.tags!r} has an empty tag")
        c.done()


@dataclass(kw_only=True)
class ProfileConfig:
    """A torch.profiler window: steps ``start_step`` .. ``start_step + steps - 1`` of ``ranks``, one
    trace per rank under ``<run-dir>/profile/`` (TensorBoard's profiler plugin or Perfetto read it);
    on GPU also NVTX ranges for nsys. The project's own modules appear as named regions."""

    start_step: int = 2
    """First profiled step (1-based; step 1 pays for warm-up)."""
    steps: int = 0
    """Steps in the window; 0: no profiling (the default)."""
    ranks: List[int] = field(default_factory=lambda: [0])
    """Global ranks that profile."""
    record_shapes: bool = False
    """Record the input shapes of every operator."""
    memory: bool = False
    """Record tensor allocations and frees (the trace's memory view)."""

    def __post_init__(self):
        c = Checks(self)
        c.positive("start_step")
        c.non_negative("steps")
        c.require(bool(self.ranks), "ranks=[] profiles no rank: list at least one global rank")
        c.require(all(r >= 0 for r in self.ranks), f"ranks={self.ranks} must be >= 0")
        c.require(len(set(self.ranks)) == len(self.ranks), f"ranks={self.ranks} lists a rank twice")
        c.done()


@dataclass(kw_only=True)
class LoggingConfig:
    """What rank 0 reports."""

    log_interval: int = 1
    """Write a metrics.jsonl record and a log line every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files to <run-dir>/tensorboard."""
    peak_tflops_per_rank: Optional[float] = None
    """The peak ``mfu`` divides by, TFLOP/s per rank; None: a known GPU's data-sheet dense bf16 peak,
    else measured (a large matmul) at the start of the run (:mod:`megatron_ext.training.throughput`)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging (off unless ``mode`` is online or offline)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """A torch.profiler window (off unless ``steps`` > 0)."""
    timers: int = 0
    """Step time breakdown through Megatron-Core's timers (``time/...`` metrics, milliseconds per step,
    the slowest rank's): 0 off; 1 data, forward-backward, gradient reduction, optimizer, callback
    hooks; 2 also forward and backward compute (a device synchronization per micro-batch)."""
    norm_interval: int = 0
    """Every this many steps log the global parameter norm and per-layer gradient and parameter norms
    (``norm/...``); 0: never."""
    slow_rank_threshold: Optional[float] = None
    """Gather every rank's busy time per step every ``log_interval`` steps and warn when the slowest
    rank's exceeds the median by this factor (``slow_rank/...`` metrics); None: off."""
    memory_snapshot_step: Optional[int] = None
    """GPU: record CUDA allocator history from the start and dump a memory snapshot (for
    pytorch.org/memory_viz) after this step, and on an out-of-memory error; None: off."""

    def __post_init__(self):
        c = Checks(self)
        c.positive("log_interval", "peak_tflops_per_rank", "memory_snapshot_step")
        c.non_negative("norm_interval")
        c.within("timers", 0, 2)
        if self.slow_rank_threshold is not None:
            c.require(
                self.slow_rank_threshold > 1.0,
                f"slow_rank_threshold={self.slow_rank_threshold!r} must be > 1 (a ratio of the slowest rank's "
                "busy time to the median)",
            )
        c.done()


STAGE_FIELDS: Dict[str, Optional[tuple]] = {
    "train": (
        "global_batch_size",
        "lr",
        "min_lr",
        "lr_schedule",
        "warmup_steps",
        "wsd_decay_steps",
        "wsd_decay_style",
        "weight_decay",
        "clip_grad",
        "eval_interval",
        "eval_steps",
    ),
    "data": None,
    "model": ("rotary_base", "rope_scaling", "max_position_embeddings"),
}
"""What a stage may override of the core sections (None: every field but ``cache_dir``). The rest
(model shapes, parallel layout, micro-batch size, seeds) is fixed for the whole run: the weights and
optimizer state carry over from stage to stage unchanged. A capability adds the fields of its own
sections that its training logic reads at every step (``Capability.stage_fields``)."""


@dataclass(kw_only=True)
class StageConfig:
    """One stage of a multi-stage run (``stages:``): its length and what it changes. The stages run in
    order in one run directory, keeping the weights, the optimizer state and the data position; each
    stage's overrides apply on top of the previous stage's settings (the first's on the run's
    sections). Each stage has its own LR schedule (``train.lr_schedule``, ``warmup_steps``, ...) over
    its own length; a stage that changes the sequence length or the data keeps the data position in
    tokens (:mod:`megatron_ext.run.schedule`)."""

    name: Optional[str] = None
    """Shown in the log; None: ``stage<index>``."""
    steps: Optional[int] = None
    """Length in optimizer steps."""
    tokens: Optional[int] = None
    """Length in training tokens: the stage ends with the first step that reaches this many tokens
    (its global batches x its sequence length). The last stage may give neither: it runs to
    ``train.steps``."""
    train: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the train section: the LR schedule's fields and the global batch (see
    :data:`STAGE_FIELDS`)."""
    data: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the data section: blend, sequence length, document flags, loss weights."""
    model: Dict[str, Any] = field(default_factory=dict)
    """Overrides of the model section: ``rotary_base``, ``rope_scaling``, ``max_position_embeddings``."""

    section_types: ClassVar[Dict[str, type]] = {"train": TrainConfig, "data": DataConfig, "model": ModelConfig}
    """The dataclass of each section a stage may override (the run config's composition adds the
    capabilities' sections, each a field of its own like ``train``)."""
    overridable: ClassVar[Dict[str, Optional[tuple]]] = STAGE_FIELDS
    """Which fields of each of those sections (None: every field but ``cache_dir``)."""

    def overrides(self) -> Dict[str, Dict[str, Any]]:
        """``{section: {field: value}}``: what this stage changes, per section (empty ones included)."""
        return {section: getattr(self, section) for section in self.overridable}

    def __post_init__(self):
        c = Checks(self)
        c.positive("steps", "tokens")
        c.require(
            self.steps is None or self.tokens is None,
            f"steps={self.steps} and tokens={self.tokens}: give the stage's length one way",
        )
        c.require(self.name is None or bool(self.name.strip()), f"name={self.name!r} is empty")
        for section, allowed in self.overridable.items():
            known = [f.name for f in dataclasses.fields(self.section_types[section])]
            for key in getattr(self, section):
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    c.require(False, f"{section}.{key} is not a field of the {section} section{hint}")
                elif allowed is None and key == "cache_dir":
                    c.require(False, f"{section}.cache_dir cannot change between stages")
                elif allowed is not None and key not in allowed:
                    c.require(
                        False,
                        f"{section}.{key} cannot change between stages (the weights and optimizer carry over); "
                        f"a stage may override {section}.{{{', '.join(allowed)}}}",
                    )
        c.done()


CORE_SECTIONS: Dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}
"""The sections every run has, in YAML order."""


def _stage_config_class(sections: Mapping[str, type], stage_fields: Mapping[str, tuple], module: str) -> type:
    """:class:`StageConfig` with a field per capability section of ``stage_fields`` (``{section:
    fields a stage may override}``), bound as ``RunConfig.StageConfig`` in ``module``."""
    for section, names in stage_fields.items():
        if section not in sections:
            raise ValueError(f"stage fields of {section!r}: no capability owns a config section of that name")
        known = {f.name for f in dataclasses.fields(sections[section])}
        missing = sorted(set(names) - known)
        if missing or not names:
            raise ValueError(f"stage fields of {section!r}: {missing or 'none'} are not fields of that section")
    if not stage_fields:
        return StageConfig
    cls = dataclasses.make_dataclass(
        "StageConfig",
        [(section, Dict[str, Any], field(default_factory=dict)) for section in stage_fields],
        bases=(StageConfig,),
        kw_only=True,
        namespace={
            "section_types": {**StageConfig.section_types, **{s: sections[s] for s in stage_fields}},
            "overridable": {**StageConfig.overridable, **{s: tuple(names) for s, names in stage_fields.items()}},
        },
    )
    cls.__module__, cls.__qualname__ = module, "RunConfig.StageConfig"
    cls.__doc__ = (StageConfig.__doc__ or "") + (
        " Capability sections a stage may change: "
        + ", ".join(f"{s} ({', '.join(n)})" for s, n in stage_fields.items())
    )
    return cls


def compose_run_config(
    sections: Mapping[str, type],
    *,
    module: str,
    methods: Optional[Mapping[str, Callable]] = None,
    stage_fields: Optional[Mapping[str, tuple]] = None,
) -> type:
    """The run-config dataclass: ``name``, the :data:`CORE_SECTIONS`, then ``sections`` (each a
    dataclass whose defaults are valid), all keyword-only, then ``stages``. ``module`` is where the
    class is bound (so that pickling finds it); ``methods`` are added to the class as they are;
    ``stage_fields`` (``{section: fields}``) are the capability fields a stage may override."""
    clash = sorted(set(sections) & (set(CORE_SECTIONS) | {"name"}))
    if clash:
        raise ValueError(f"config sections {clash} are core sections: give the capability's sections other names")
    stage_cls = _stage_config_class(sections, stage_fields or {}, module)
    fields: List[Any] = [("name", str, field(default="run"))]
    for section, cls in {**CORE_SECTIONS, **sections}.items():
        fields.append((section, cls, field(default_factory=cls)))
    fields.append(("stages", List[stage_cls], field(default_factory=list)))
    namespace = dict(methods or {}, StageConfig=stage_cls)
    cls = dataclasses.make_dataclass("RunConfig", fields, kw_only=True, namespace=namespace)
    cls.__module__ = module
    cls.__doc__ = (
        "A whole run: every section of configs/*.yaml ("
        + ", ".join(["name", *CORE_SECTIONS, *sections, "stages"])
        + ")."
    )
    return cls
