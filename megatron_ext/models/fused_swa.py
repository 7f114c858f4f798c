"""The fused CPU sliding-window attention kernel: a C++ extension, built on first use.

``csrc/sliding_window_attention.cpp`` computes each query block as two BLAS GEMMs over the block's
contiguous key slice with the row softmax fused between them, in one pass over each row's band while
the block's scores are in cache, and parallelizes over (batch, KV head) with torch's thread pool. The
forward saves each row's log-sum-exp, so the backward recomputes the probabilities block by block
(FlashAttention-2's recurrences); nothing of size ``T x W`` outlives a block. Each KV head has its own
window (:data:`FULL`: full causal attention), so a layer that mixes full and sliding-window heads is
one call whose threads are balanced by each head's cost; in dual mode every head also attends with an
inner window from the same scores (ConSA's mask-learning layer: full and sliding-window attention from
one computation of ``Q K^T``, :func:`fused_full_and_window_attention`). It is the CPU training
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
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

__all__ = [
    "FULL",
    "available",
    "fused_full_and_window_attention",
    "fused_kernel_error",
    "fused_sliding_window_attention",
    "runs",
    "takes",
]

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

FULL = 0
"""A KV head's window meaning full causal attention (the kernel reads any window <= 0 or >= Tk so)."""


@torch.library.custom_op("megatron_ext::sliding_window_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: List[int],
    inner: int,
    scale: float,
    block: int,
    key_start: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, out_inner, lse_inner); the inner ones are empty unless ``inner > 0`` (dual mode)."""
    starts = _NO_DOCUMENTS if key_start is None else key_start
    out, lse, out_inner, lse_inner = _load()[0].forward(
        q, k, v, torch.tensor(windows, dtype=torch.long), inner, scale, block, starts
    )
    return out, lse, out_inner, lse_inner


@_forward_op.register_fake
def _(q, k, v, windows, inner, scale, block, key_start=None):
    lse = q.new_empty(q.shape[:3])
    if inner > 0:
        return torch.empty_like(q), lse, torch.empty_like(q), q.new_empty(q.shape[:3])
    return torch.empty_like(q), lse, q.new_empty(0), q.new_empty(0, *q.shape[1:3])


@torch.library.custom_op("megatron_ext::sliding_window_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    grad_inner: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    out_inner: torch.Tensor,
    lse_inner: torch.Tensor,
    windows: List[int],
    inner: int,
    scale: float,
    block: int,
    key_start: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    starts = _NO_DOCUMENTS if key_start is None else key_start
    windows_ = torch.tensor(windows, dtype=torch.long)
    dq, dk, dv = _load()[0].backward(
        grad_out, grad_inner, q, k, v, out, lse, out_inner, lse_inner, windows_, inner, scale, block, starts
    )
    return dq, dk, dv


@_backward_op.register_fake
def _(grad_out, grad_inner, q, k, v, out, lse, out_inner, lse_inner, windows, inner, scale, block, key_start=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _pairs(q_shape, k_shape, windows, inner: int, block: int) -> int:
    """Score pairs of a call, by the convention of the model's FLOP count: a full head counts the full
    ``Tq x Tk`` square (as FlopCounterMode counts SDPA), a windowed band what the kernel multiplies
    (:func:`~megatron_ext.models.kernels.window_kernel_pairs`); the inner band of dual mode is added."""
    from megatron_ext.models.kernels import window_kernel_pairs  # kernels imports this module

    b, hq, t, _ = q_shape
    kv_len, group = k_shape[2], hq // k_shape[1]

    def band(window: int) -> int:
        if window <= FULL:
            return t * kv_len
        return window_kernel_pairs(t, window, block, kv_len=kv_len)

    per_kv_head = [band(w) + (band(inner) if inner > 0 else 0) for w in windows]
    return b * group * sum(per_kv_head)


@register_flop_formula(torch.ops.megatron_ext.sliding_window_forward)
def _forward_flops(q_shape, k_shape, v_shape, windows, inner, scale, block, *args, out_shape=None, **kwargs) -> int:
    return 2 * 2 * q_shape[3] * _pairs(q_shape, k_shape, windows, inner, block)  # S = Q K^T, O = P V


@register_flop_formula(torch.ops.megatron_ext.sliding_window_backward)
def _backward_flops(
    grad_shape,
    grad_inner_shape,
    q_shape,
    k_shape,
    v_shape,
    out_shape_,
    lse_shape,
    out_inner_shape,
    lse_inner_shape,
    windows,
    inner,
    scale,
    block,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    return 5 * 2 * q_shape[3] * _pairs(q_shape, k_shape, windows, inner, block)  # S again, dV, dP, dQ, dK


class _FusedSlidingWindowAttention(torch.autograd.Function):
    """Single mode (``inner == 0``): the attention with each KV head's window. Dual mode: also with the
    inner window, both outputs returned."""

    @staticmethod
    def forward(ctx, q, k, v, windows: List[int], inner: int, scale: float, block: int, key_start):
        q, k, v = _rows(q), _rows(k), _rows(v)
        documents = () if key_start is None else (key_start,)  # the call without documents has no extra operand
        out, lse, out_inner, lse_inner = _forward_op(q, k, v, windows, inner, scale, block, *documents)
        ctx.save_for_backward(q, k, v, out, lse, out_inner, lse_inner)
        ctx.params = (windows, inner, scale, block)
        ctx.documents = documents
        if inner > 0:
            return out, out_inner
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_inner=None):
        q, k, v, out, lse, out_inner, lse_inner = ctx.saved_tensors
        inner = ctx.params[1]
        if inner > 0:  # an output that takes no part in the loss has a zero gradient
            grad_out = torch.zeros_like(out) if grad_out is None else _rows(grad_out)
            grad_inner = torch.zeros_like(out_inner) if grad_inner is None else _rows(grad_inner)
        else:
            grad_out, grad_inner = _rows(grad_out), out_inner  # no inner gradient: the empty tensor stands in
        dq, dk, dv = _backward_op(
            grad_out, grad_inner, q, k, v, out, lse, out_inner, lse_inner, *ctx.params, *ctx.documents
        )
        return dq, dk, dv, None, None, None, None, None


def takes(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernel computes on these tensors: float32, on the CPU."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def runs(*tensors: torch.Tensor) -> bool:
    """Whether these tensors go through the fused kernel here: it takes them and it is built (warns once
    when it cannot be)."""
    return takes(*tensors) and available()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    if not takes(q, k, v):
        raise ValueError(f"the fused kernel takes float32 CPU tensors; got {q.dtype} on {q.device}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")


def _windows(window: Union[int, Sequence[int]], kv_heads: int, kv_len: int) -> List[int]:
    """One window per KV head, each ``FULL`` or in ``[1, kv_len]``: a window past the keys is clipped to
    them (it computes what full attention does, and counts its FLOPs as a window)."""
    windows = [int(window)] * kv_heads if isinstance(window, int) else [int(w) for w in window]
    if len(windows) != kv_heads:
        raise ValueError(f"{len(windows)} windows for {kv_heads} KV heads: give one window, or one per KV head")
    return [FULL if w <= FULL else min(w, kv_len) for w in windows]


def fused_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: Union[int, Sequence[int]],
    scale: float,
    block_size: int,
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal sliding-window attention through the fused kernel; float32 CPU tensors, shapes and window
    convention of :mod:`megatron_ext.models.kernels` (``q [b, hq, Tq, d]``, ``k, v [b, hkv, Tk, d]``,
    ``Tk >= Tq``), ``block_size`` query rows per block; ``key_start [b, Tq]`` (int64): each query's
    first visible key (document masking). ``window``: one for every head, or one per KV head, where
    ``FULL`` (0) is full causal attention: a layer of mixed heads in one call, each head costing its
    own band. Call :func:`available` first."""
    _check(q, k, v, block_size)
    if key_start is not None:
        key_start = key_start.contiguous()
    windows = _windows(window, k.shape[1], k.shape[2])
    return _FusedSlidingWindowAttention.apply(q, k, v, windows, 0, float(scale), block_size, key_start)


def fused_full_and_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    block_size: int,
    key_start: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(full causal attention, sliding-window attention)`` of the same inputs from one pass of the
    fused kernel (dual mode: the window's scores are a part of the full ones, computed once); the
    arguments as :func:`fused_sliding_window_attention`, one window for every head."""
    _check(q, k, v, block_size)
    if key_start is not None:
        key_start = key_start.contiguous()
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    full = [FULL] * k.shape[1]
    return _FusedSlidingWindowAttention.apply(
        q, k, v, full, min(window, k.shape[2]), float(scale), block_size, key_start
    )
