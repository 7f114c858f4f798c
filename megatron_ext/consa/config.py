"""The ``hybrid_attention`` section of the run config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_ext.consa.gates import HardConcreteConfig


@dataclass
class HybridAttentionConfig:
    """Full / sliding-window attention per layer or per KV head: learned (ConSA) or by rule."""

    enabled: bool = False
    """Use hybrid attention (False: every layer uses full attention)."""
    method: Literal["consa", "scalar_rank", "rule_layer", "rule_head", "static"] = "consa"
    """consa: hard-concrete L0 gates + augmented Lagrangian, then binarize (the paper's method);
    scalar_rank: the ablation with continuous scalar gates, then the lowest-ranked units become SWA;
    rule_layer: a fixed layer pattern (``layer_pattern``, Mistral / Gemma-2 style interleave);
    rule_head: the same SWA fraction of KV heads in every layer; static: ``allocation`` file."""
    granularity: Literal["layer", "kv_head"] = "kv_head"
    """Unit of the choice: a whole layer, or one KV head (all query heads of its group follow it)."""
    window: int = 512
    """Sliding window W: query i sees keys i-W+1..i. [choice] 512: the paper does not state it."""
    target: float = 0.5
    """Target fraction rho of units that use SWA."""
    constraint: Literal["global", "per_layer"] = "per_layer"
    """Whether rho is met over all units at once or by every layer's KV heads on their own."""
    mask_learning_steps: Optional[int] = None
    """Length of stage 1 (learned methods) in optimizer steps; then binarize and train the static
    hybrid. Alternatively give ``mask_learning_tokens``."""
    mask_learning_tokens: Optional[int] = None
    """Length of stage 1 in tokens (the paper: 1B), converted with the global batch and sequence."""
    target_warmup_steps: int = 0
    """The target rises linearly from 0 to ``target`` over this many steps."""
    gate_lr: float = 0.1
    """Adam learning rate of the gate logits (their own optimizer, as LLM-Shearing). [choice]"""
    gate_adam_beta1: float = 0.0
    """Adam beta1 of the gate logits. [choice] 0 (no momentum): momentum on top of the integral
    action of lambda1 made rho_hat swing between ~0 and ~0.95 for hundreds of steps in our
    tests; without it the constraint settles within ~150 steps (beta2 is 0.99)."""
    lambda_lr: float = 5.0
    """Step size of the gradient ascent on the Lagrange multipliers. [choice]"""
    layer_pattern: str = "SSSF"
    """rule_layer: S = SWA layer, F = full layer, repeated over the depth (e.g. 3 SWA : 1 FA)."""
    allocation: Optional[str] = None
    """static: an allocation.json written by a mask-learning run."""
    hard_concrete: HardConcreteConfig = field(default_factory=HardConcreteConfig)
    """Hard-concrete constants (Louizos et al. 2018 / LLM-Shearing defaults)."""

    def __post_init__(self):
        problems = []
        if self.window < 1:
            problems.append(f"hybrid_attention.window={self.window} must be >= 1")
        if not 0.0 <= self.target <= 1.0:
            problems.append(f"hybrid_attention.target={self.target} must be in [0, 1]")
        if not 0.0 <= self.gate_adam_beta1 < 1.0:
            problems.append(f"hybrid_attention.gate_adam_beta1={self.gate_adam_beta1} must be in [0, 1)")
        if self.gate_lr <= 0 or self.lambda_lr <= 0:
            problems.append(f"hybrid_attention.gate_lr={self.gate_lr} / lambda_lr={self.lambda_lr} must be > 0")
        if self.target_warmup_steps < 0:
            problems.append(f"hybrid_attention.target_warmup_steps={self.target_warmup_steps} must be >= 0")
        if self.enabled and self.method in ("consa", "scalar_rank"):
            given = [n for n in ("mask_learning_steps", "mask_learning_tokens") if getattr(self, n) is not None]
            if len(given) != 1:
                problems.append(f"hybrid_attention.method={self.method!r} needs exactly one of "
                                "mask_learning_steps / mask_learning_tokens (the length of stage 1)")
            for name in given:
                if getattr(self, name) <= 0:
                    problems.append(f"hybrid_attention.{name}={getattr(self, name)} must be positive")
        if self.constraint == "per_layer" and self.granularity == "layer" and self.method in ("consa", "scalar_rank"):
            problems.append("hybrid_attention.constraint='per_layer' needs granularity 'kv_head' (a layer "
                            "unit cannot meet a fraction on its own); use constraint 'global'")
        if self.method == "rule_layer" and (not self.layer_pattern or set(self.layer_pattern) - {"S", "F"}):
            problems.append(f"hybrid_attention.layer_pattern={self.layer_pattern!r} must be letters S and F")
        if self.enabled and self.method == "static" and not self.allocation:
            problems.append("hybrid_attention.method='static' needs allocation: path/to/allocation.json")
        if problems:
            from megatron_ext.config.loader import ConfigError  # here: the config package imports this module

            raise ConfigError(problems)

    def mask_learning_length(self, tokens_per_step: int) -> int:
        """Stage-1 length in steps."""
        if self.mask_learning_steps is not None:
            return self.mask_learning_steps
        return max(1, round(self.mask_learning_tokens / tokens_per_step))
