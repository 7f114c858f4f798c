"""The fused CPU sliding-window attention kernel: a C++ extension, built on first use.

``csrc/sliding_window_attention.cpp`` computes each query block as two BLAS GEMMs over the block's
contiguous key slice with the row softmax fused between them, in one pass over each row's band while
the block's scores are in cache, and parallelizes over (batch, KV head) with torch's thread pool. The
forward saves each row's log-sum-exp, so the backward recomputes the probabilities block by block
(FlashAttention-2's recurrences); nothing of size ``T x W`` outlives a block. It is the CPU training
kernel of :func:`~megatron_ext.models.kernels.sliding_window_attention` for float32; the blocked
kernel (torch ops per block) is the fallback where the extension cannot be built, and for other
dtypes. Both match the masked reference (``tests/unit/test_swa_kernels.py``).

Build [choice]: ``torch.utils.cpp_extension.load`` compiles it once per machine into torch's extension
cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), about 40 s, under a file lock
so that ranks starting together build it once (a lock left by a killed build is removed after
``STALE_LOCK_SECONDS``). The SIMD level is torch's own
(``torch.backends.cpu.get_cpu_capability()``): it names the build, so nodes of a cluster with
different CPUs sharing a home directory each get a build for their instruction set. GEMMs go to the
BLAS of the torch build through its exported ``sgemm_`` (MKL in the x86-64 wheels).

If the build or the load fails (no C++ compiler, a torch build without an exported ``sgemm_``), one
warning says why and the blocked kernel runs instead; :func:`fused_kernel_error` tells.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
import warnings
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

__all__ = ["available", "fused_kernel_error", "fused_sliding_window_attention"]

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "sliding_window_attention.cpp")

# torch's CPU capability -> compiler flags that enable the matching at::vec implementation.
_SIMD_FLAGS = {
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


def _ninja_on_path() -> None:
    """torch builds with ninja; the ``ninja`` wheel puts it beside the interpreter, which is not on
    ``PATH`` when a virtual environment's python runs without activation."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


STALE_LOCK_SECONDS = 600
"""A build takes about 40 s; torch's build lock older than this was left by a killed build (torch
would wait for it forever) and is removed."""


def _remove_stale_lock(build_dir: str) -> None:
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return  # no lock
    if age > STALE_LOCK_SECONDS:
        warnings.warn(
            f"removing {lock}, left {age:.0f} s ago by a build of the CPU sliding-window kernel that did not finish",
            RuntimeWarning,
            stacklevel=3,
        )
        try:
            os.remove(lock)
        except FileNotFoundError:
            pass


@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) or (None, why it could not be built or loaded)."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    simd = _SIMD_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])
    name = f"megatron_ext_swa_cpu_{capability.lower() if capability in _SIMD_FLAGS else 'default'}"
    build_dir = os.path.join(
        cpp_extension.get_default_build_root(), f"py{sys.version_info[0]}{sys.version_info[1]}_cpu", name
    )
    _ninja_on_path()
    try:
        os.makedirs(build_dir, exist_ok=True)
        _remove_stale_lock(build_dir)
        module = cpp_extension.load(
            name=name,
            sources=[_SOURCE],
            extra_cflags=["-O3", "-fopenmp", *simd],
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
            verbose=False,
        )
    except Exception as exc:  # compiler missing, link error, ...: the blocked kernel still works
        reason = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {reason[-1] if reason else ''}"
    return module, None


def fused_kernel_error() -> Optional[str]:
    """None when the fused kernel is usable here, else why not (builds it on first call)."""
    return _load()[1]


def available() -> bool:
    """Whether the fused kernel is built and loaded; warns once (with the reason) when it is not."""
    module, error = _load()
    if module is None:
        _warn_fallback(error)
    return module is not None


@functools.lru_cache(maxsize=None)
def _warn_fallback(error: str) -> None:
    warnings.warn(
        f"the fused CPU sliding-window attention kernel could not be built ({error}); using the "
        "blocked kernel, about 1.5x slower: install a C++ compiler (g++) and the project's "
        "dependencies (ninja)",
        RuntimeWarning,
        stacklevel=3,
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernel reads it: any strides with a contiguous last dimension and rows at least a
    row apart (a permuted ``[T, B, H, D]`` tensor stays a view); anything else is copied."""
    if x.stride(-1) != 1 or (x.shape[2] > 1 and x.stride(2) < x.shape[-1]):
        return x.contiguous()
    return x


# The kernel's two entry points as torch operators, so that the dispatcher (and FlopCounterMode, through
# the FLOP formulas below) sees them as it sees torch's own attention kernels.


_NO_DOCUMENTS = torch.empty(0, dtype=torch.long)
"""The kernel's ``key_start`` without document masking: an empty tensor (every row's band starts at 0)."""


@torch.library.custom_op("megatron_ext::sliding_window_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    block: int,
    key_start: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    starts = _NO_DOCUMENTS if key_start is None else key_start
    out, lse = _load()[0].forward(q, k, v, window, scale, block, starts)
    return out, lse


@_forward_op.register_fake
def _(q, k, v, window, scale, block, key_start=None):
    return torch.empty_like(q), q.new_empty(q.shape[:3])


@torch.library.custom_op("megatron_ext::sliding_window_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    window: int,
    scale: float,
    block: int,
    key_start: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    starts = _NO_DOCUMENTS if key_start is None else key_start
    dq, dk, dv = _load()[0].backward(grad_out, q, k, v, out, lse, window, scale, block, starts)
    return dq, dk, dv


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, window, scale, block, key_start=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _block_pairs(q_len: int, kv_len: int, window: int, block: int) -> int:
    from megatron_ext.models.kernels import window_kernel_pairs  # kernels imports this module

    return window_kernel_pairs(q_len, window, block, kv_len=kv_len)


@register_flop_formula(torch.ops.megatron_ext.sliding_window_forward)
def _forward_flops(q_shape, k_shape, v_shape, window, scale, block, *args, out_shape=None, **kwargs) -> int:
    b, h, t, d = q_shape
    return 2 * 2 * b * h * d * _block_pairs(t, k_shape[2], window, block)  # S = Q K^T, O = P V


@register_flop_formula(torch.ops.megatron_ext.sliding_window_backward)
def _backward_flops(
    grad_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, window, scale, block, *args, out_shape=None, **kwargs
) -> int:
    b, h, t, d = q_shape
    return 5 * 2 * b * h * d * _block_pairs(t, k_shape[2], window, block)  # S again, dV, dP, dQ, dK


class _FusedSlidingWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float, block: int, key_start: Optional[torch.Tensor]):
        q, k, v = _rows(q), _rows(k), _rows(v)
        if key_start is None:  # the call without documents stays what it was (no extra operand)
            out, lse = _forward_op(q, k, v, window, scale, block)
        else:
            out, lse = _forward_op(q, k, v, window, scale, block, key_start)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = (window, scale, block)
        ctx.key_start = key_start
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        documents = () if ctx.key_start is None else (ctx.key_start,)
        dq, dk, dv = _backward_op(_rows(grad_out), q, k, v, out, lse, *ctx.params, *documents)
        return dq, dk, dv, None, None, None, None


def fused_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    block_size: int,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal sliding-window attention through the fused kernel; float32 CPU tensors, shapes and window
    convention of :mod:`megatron_ext.models.kernels` (``q [b, hq, Tq, d]``, ``k, v [b, hkv, Tk, d]``,
    ``Tk >= Tq``), ``block_size`` query rows per block; ``key_start [b, Tq]`` (int64): each query's
    first visible key (document masking). Call :func:`available` first."""
    if q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32 or q.is_cuda:
        raise ValueError(f"the fused kernel takes float32 CPU tensors; got {q.dtype} on {q.device}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    if key_start is not None:
        key_start = key_start.contiguous()
    return _FusedSlidingWindowAttention.apply(q, k, v, min(window, k.shape[2]), float(scale), block_size, key_start)
