"""Optimizers: Megatron's own on GPU, a ``main_grad``-aware AdamW with global-norm clipping on CPU."""

from megatron_ext.optim.builder import build_optimizer
from megatron_ext.optim.cpu_optimizer import CPUAdamW, global_grad_norm

__all__ = ["CPUAdamW", "build_optimizer", "global_grad_norm"]
