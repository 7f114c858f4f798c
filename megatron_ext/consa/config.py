"""The ``hybrid_attention`` section of the run config (ConSA, arXiv 2606.18056), and its gate constants."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, get_args

from megatron_ext.config import Checks

ConstraintMode = Literal["global", "per_layer"]
"""How the SWA fraction is measured: over all units at once, or layer by layer (one value per layer)."""

CONSTRAINT_MODES = get_args(ConstraintMode)

LEARNED_METHODS = ("consa", "scalar_rank", "loza")
"""Methods that learn the allocation in a first stage (mask learning) and then binarize it."""


@dataclass(kw_only=True)
class HardConcreteConfig:
    """Constants of the hard concrete distribution and of the ``log_alpha`` initialisation.

    The defaults are those of Louizos et al. (2018, arXiv 1712.01312) [paper] and LLM-Shearing [code]:
    beta = 2/3, (gamma, zeta) = (-0.1, 1.1), log_alpha ~ N(5, 0.01^2) (every gate starts open, i.e.
    every unit uses full attention) and log_alpha kept in [ln 1e-2, ln 1e2].
    """

    beta: float = 2.0 / 3.0
    """Temperature of the binary concrete; smaller values make samples closer to Bernoulli."""
    gamma: float = -0.1
    """Lower end of the stretch interval (gamma, zeta); must be < 0 so that z = 0 has mass."""
    zeta: float = 1.1
    """Upper end of the stretch interval; must be > 1 so that z = 1 has mass."""
    eps: float = 1e-6
    """The uniform noise is drawn from U(eps, 1 - eps) so that ln u and ln(1 - u) stay finite."""
    init_mean: float = 5.0
    """Mean of the normal initialisation of log_alpha; 5 gives P(z != 0) ~ 0.999 ("all full attention")."""
    init_std: float = 0.01
    """Standard deviation (not variance) of the normal initialisation of log_alpha."""
    log_alpha_min: float = math.log(1e-2)
    """Lower bound that ``clamp_()`` applies to log_alpha after each optimizer step."""
    log_alpha_max: float = math.log(1e2)
    """Upper bound that ``clamp_()`` applies to log_alpha. The default init mean (5) lies above it, as in
    LLM-Shearing [code]: the initial values are used as drawn and the first clamp moves them to
    ln 100 ~ 4.61."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.finite("beta", "gamma", "zeta", "eps", "init_mean", "init_std", "log_alpha_min", "log_alpha_max")
        c.require(not self.beta <= 0, f"beta={self.beta!r} is not allowed: the temperature must be > 0")
        c.require(not self.gamma >= 0, f"gamma={self.gamma!r} is not allowed: use a number < 0 (P(z = 0) > 0 needs it)")
        c.require(not self.zeta <= 1, f"zeta={self.zeta!r} is not allowed: use a number > 1 (P(z = 1) > 0 needs it)")
        c.require(0 < self.eps < 0.5, f"eps={self.eps!r} is not allowed: use a number in (0, 0.5)")
        c.require(not self.init_std < 0, f"init_std={self.init_std!r} is not allowed: use a number >= 0")
        c.require(
            not self.log_alpha_max <= self.log_alpha_min,
            f"log_alpha_max={self.log_alpha_max!r} is not allowed: use a number > log_alpha_min={self.log_alpha_min!r}",
        )
        c.done()


@dataclass(kw_only=True)
class HybridAttentionConfig:
    """Full / sliding-window attention per layer or per KV head: learned (ConSA) or by rule."""

    enabled: bool = False
    """Use hybrid attention (False: every layer uses full attention)."""
    method: Literal["consa", "scalar_rank", "loza", "rule_layer", "rule_head", "static"] = "consa"
    """consa: hard-concrete L0 gates + augmented Lagrangian, then binarize (the paper's method);
    scalar_rank: the ablation with continuous scalar gates, then the lowest-ranked units become SWA;
    loza: the LoZA baseline [digest]: one scalar gate a per layer learned on a frozen model (the
    model's learning rate is 0 during stage 1), out = a * dense + (1 - a) * sparse with sink +
    recent attention as the sparse part (``sink_tokens`` > 0; LoZA uses sink 128 + recent 896), then
    the lowest-ranked layers become sparse; rule_layer: a fixed layer pattern (``layer_pattern``,
    Mistral / Gemma-2 style interleave); rule_head: the same SWA fraction of KV heads in every
    layer; static: ``allocation`` file."""
    granularity: Literal["layer", "kv_head"] = "kv_head"
    """Unit of the choice: a whole layer, or one KV head (all query heads of its group follow it)."""
    window: int = 512
    """Sliding window W: query i sees keys i-W+1..i. [choice] 512: the paper does not state it."""
    sink_tokens: int = 0
    """Attention sinks of the sparse units: > 0 makes them attend to the first ``sink_tokens`` keys as
    well as the last ``window`` (LoZA's sink + recent pattern; computed at dense cost [choice]);
    0: plain sliding-window attention."""
    target: float = 0.5
    """Target fraction rho of units that use SWA: a whole number of the units it counts (layers; KV
    heads of a layer with ``per_layer``; all KV heads with ``global``), to two decimals, else refused
    (binarization would round it to another fraction)."""
    constraint: Literal["global", "per_layer"] = "per_layer"
    """Whether rho is met over all units at once or by every layer's KV heads on their own."""
    mask_learning_start_step: int = 0
    """Learned methods: the model trains as plain full attention for this many steps, then learns its
    mask; stage 1's length and the target warm-up count from here (0: mask learning from the first
    step). A dense warm-up lets the long-range circuits form before gates can close on them."""
    mask_learning_steps: Optional[int] = None
    """Length of stage 1 (learned methods) in optimizer steps; then binarize and train the static
    hybrid. Alternatively give ``mask_learning_tokens``."""
    mask_learning_tokens: Optional[int] = None
    """Length of stage 1 in tokens (the paper: 1B [digest]), converted with the global batch and sequence."""
    target_warmup_steps: int = 0
    """The target rises linearly from 0 to ``target`` over this many steps (as LLM-Shearing [code])."""
    gate_init: Literal["open", "target"] = "open"
    """Where the gate logits start (consa). ``open``: log_alpha ~ N(hard_concrete.init_mean, init_std),
    every unit full attention, as LLM-Shearing [code]; the target then warms up
    (``target_warmup_steps``) and the constraint pulls every gate down together. ``target``
    [choice]: log_alpha ~ N(m, init_std) with m such that P(z != 0) = 1 - target, i.e. the expected
    SWA fraction already equals the target (per layer alike): no common pull, so from the first step
    the gates move apart by their own LM gradients. On natural text this separated units that
    ``open`` left tied at the same stage-1 length (README, "ConSA on natural text"). Use it with
    ``target_warmup_steps: 0``."""
    gate_lr: float = 0.1
    """Adam learning rate of the gate logits (their own optimizer, as LLM-Shearing [code]). [choice]"""
    gate_adam_beta1: float = 0.0
    """Adam beta1 of the gate logits. [choice] 0 (no momentum): momentum on top of the integral
    action of lambda1 made rho_hat swing between ~0 and ~0.95 for hundreds of steps in our
    tests; without it the constraint settles within ~150 steps (beta2 is 0.99)."""
    lambda_lr: float = 5.0
    """Step size of the gradient ascent on the Lagrange multipliers. [choice]"""
    binarize: Literal["exact_target", "sign"] = "exact_target"
    """How learned gates (consa, scalar_rank, loza) become the static allocation: ``exact_target``
    [choice] the round(target * N) units of lowest log_alpha become SWA (per layer with ``per_layer``
    constraints), as LLM-Shearing's evaluation mask; ``sign`` (ConSA's stated rule, z = 1[log_alpha >
    0], the ablation) a unit stays full attention iff its log_alpha > 0, whatever fraction that gives:
    the fraction reached is logged and written to allocation.json beside the target."""
    polarization_threshold: float = 2.0
    """A gate counts as decided (polarized) when its log_alpha lies at least this far beyond every unit
    that the binarization puts on the other side of its constraint group (FA units above the group's
    SWA units, SWA units below its FA units; by the sign when the group has one side only);
    ``consa/polarized_fraction`` reports the share of such units. [choice]"""
    min_polarized_fraction: float = 0.9
    """At binarization, fewer decided units than this fraction among the FA units, or among the SWA
    units, is reported as a WARNING (log and allocation.json): the allocation is then largely a tie
    broken by rank. [choice]"""
    window_cost_tolerance: float = 0.01
    """When mask learning starts from trained weights (a dense warm-up, ``mask_learning_start_step``
    > 0, or ``train.init_from``), the validation loss with every unit on SWA minus the one with full
    attention is measured on those weights (``consa/window_cost``, nats; two evaluations of
    ``train.eval_steps`` batches, once per run). At most this much, the model
    does not use keys beyond the window: undecided gates are then reported as harmless ties (every
    allocation at the target costs about the same), not as a WARNING. Above it, or when nothing was
    measured (mask learning from untrained weights), undecided gates warn. [choice]"""
    unit_window_cost: bool = False
    """With the window-cost measurement (mask learning from trained weights), also evaluate each unit
    alone on SWA, every other unit full (``L x units`` more evaluations of ``train.eval_steps``
    batches): which units carry the window cost, logged and written to allocation.json beside the
    learned log_alpha. [choice] Off by default: at the paper's 28 x 8 units it costs 224 evaluations."""
    constraint_tolerance: float = 0.05
    """At binarization, an expected SWA fraction this far (any layer with ``per_layer``) from the one
    the binarized allocation has with its gates at their clamp bounds is reported as a WARNING: the
    constraint had not settled. [choice]"""
    layer_pattern: Optional[str] = None
    """rule_layer: S = SWA layer, F = full layer, repeated over the depth (e.g. SSSF: 3 SWA : 1 FA);
    it must give round(target * num_layers) SWA layers. None: derived from ``target`` (the FA layers
    spread evenly, the last one FA)."""
    allocation: Optional[str] = None
    """static: an allocation.json written by a mask-learning run."""
    hard_concrete: HardConcreteConfig = field(default_factory=HardConcreteConfig)
    """Hard-concrete constants (Louizos et al. 2018 [paper] / LLM-Shearing [code] defaults)."""

    def __post_init__(self):
        c = Checks(self)
        c.positive(
            "window",
            "gate_lr",
            "lambda_lr",
            "mask_learning_steps",
            "mask_learning_tokens",
            "polarization_threshold",
            "constraint_tolerance",
        )
        c.non_negative("mask_learning_start_step", "sink_tokens", "window_cost_tolerance")
        if self.method == "loza":
            c.require(
                self.granularity == "layer",
                f"method='loza' learns one gate per layer: set granularity: layer (got {self.granularity!r})",
            )
            c.require(
                self.sink_tokens > 0,
                "method='loza' needs sink_tokens > 0 (its sparse attention is sink + "
                "recent; LoZA uses sink_tokens: 128, window: 896)",
            )
        c.within("min_polarized_fraction", 0.0, 1.0)
        c.within("target", 0.0, 1.0)
        c.within("gate_adam_beta1", 0.0, 1.0, high_open=True)
        c.non_negative("target_warmup_steps")
        c.one_of("constraint", CONSTRAINT_MODES)
        c.one_of("binarize", ("exact_target", "sign"))
        c.one_of("gate_init", ("open", "target"))
        c.require(
            not (self.gate_init == "target" and self.target_warmup_steps > 0),
            f"gate_init='target' starts the gates at the target, but target_warmup_steps={self.target_warmup_steps} "
            "would first lower the target to 0 and pull every gate open again: set target_warmup_steps: 0",
        )
        c.require(
            not (self.gate_init == "target" and self.method == "consa" and not 0.0 < self.target < 1.0),
            f"gate_init='target' needs 0 < target < 1 (got {self.target}): at 0 or 1 no finite log_alpha meets it",
        )
        if self.enabled and self.method in LEARNED_METHODS:
            given = [n for n in ("mask_learning_steps", "mask_learning_tokens") if getattr(self, n) is not None]
            c.require(
                len(given) == 1,
                f"method={self.method!r} needs exactly one of mask_learning_steps / "
                "mask_learning_tokens (the length of stage 1)",
            )
        c.require(
            not (self.constraint == "per_layer" and self.granularity == "layer" and self.method == "consa"),
            "constraint='per_layer' needs granularity 'kv_head' (a layer unit cannot meet a fraction on "
            "its own); use constraint 'global'",
        )
        if self.method == "rule_layer" and self.layer_pattern is not None:
            c.require(
                bool(self.layer_pattern) and not set(self.layer_pattern) - {"S", "F"},
                f"layer_pattern={self.layer_pattern!r} must be letters S and F",
            )
        c.require(
            not (self.enabled and self.method == "static" and not self.allocation),
            "method='static' needs allocation: path/to/allocation.json",
        )
        c.done()

    def initial_hard_concrete(self) -> HardConcreteConfig:
        """The hard-concrete constants with ``init_mean`` where ``gate_init`` starts the gates: for
        ``target``, m = logit(1 - rho) + beta * ln(-gamma / zeta), the inverse of P(z != 0) =
        sigmoid(m - beta * ln(-gamma / zeta)) = 1 - rho."""
        hc = self.hard_concrete
        if self.gate_init == "open":
            return hc
        keep = 1.0 - self.target
        mean = math.log(keep / (1.0 - keep)) + hc.beta * math.log(-hc.gamma / hc.zeta)
        return dataclasses.replace(hc, init_mean=mean)

    def mask_learning_length(self, consumed_tokens: Callable[[int], int]) -> int:
        """Stage-1 length in steps: ``mask_learning_steps``, or the fewest steps from
        ``mask_learning_start_step`` whose tokens reach ``mask_learning_tokens``, counted with
        ``consumed_tokens(step)`` (tokens trained after ``step`` steps: the real ones, whatever a batch
        ramp-up or the stages' sequence lengths make of a step)."""
        if self.mask_learning_steps is not None:
            return self.mask_learning_steps
        start, steps = consumed_tokens(self.mask_learning_start_step), 1
        while consumed_tokens(self.mask_learning_start_step + steps) - start < self.mask_learning_tokens:
            steps += 1
        return steps
