"""Compatibility layer: run Megatron-Core 0.16.1 on a CPU-only torch with the gloo backend, and
keep every use of a Megatron-Core internal in one place, version-gated.

Call :func:`enable_cpu_support` once per process, before building models. It is a no-op when
CUDA is available, so the same entry points run unchanged on GPU clusters.

The other modules wrap the Megatron-Core internals the project needs (private functions and
attributes, per-instance overrides, shared config state), each checked against the version it was
written for before first use (:mod:`megatron_ext.compat.internals`): ``layers`` (TransformerLayer),
``moe`` (TopKRouter), ``optim`` (param groups), ``distributed`` (process-group teardown),
``datasets`` (GPTDataset sample spans) and ``recompute`` (a 0.16.1 bug without Transformer Engine).
"""

from megatron_ext.compat.cpu import SUPPORTED_MEGATRON_CORE, cpu_support_active, enable_cpu_support
from megatron_ext.compat.internals import MegatronInternalError
from megatron_ext.compat.recompute import fix_recompute_without_te

__all__ = [
    "SUPPORTED_MEGATRON_CORE",
    "MegatronInternalError",
    "cpu_support_active",
    "enable_cpu_support",
    "fix_recompute_without_te",
]
