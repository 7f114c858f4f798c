"""Compatibility layer: run Megatron-Core 0.16.1 on a CPU-only torch with the gloo backend.

Call :func:`enable_cpu_support` once per process, before building models. It is a no-op when
CUDA is available, so the same entry points run unchanged on GPU clusters.
"""

from megatron_ext.compat.cpu import SUPPORTED_MEGATRON_CORE, cpu_support_active, enable_cpu_support

__all__ = ["SUPPORTED_MEGATRON_CORE", "cpu_support_active", "enable_cpu_support"]
