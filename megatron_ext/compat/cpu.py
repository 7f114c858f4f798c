"""Redirect Megatron-Core's CUDA assumptions to the CPU, for CPU-only torch builds.

Megatron-Core 0.16.1 assumes a GPU in a few hundred places (see the list below). On a machine
without CUDA we redirect each of them, in this one module, so that model construction
(``use_cpu_initialization``), tensor / pipeline / expert / data parallel forward and backward,
Megatron DDP, the model-parallel RNG tracker and ``dist_checkpointing`` run on CPU with gloo.

Every redirected point, with its reason (all observed on megatron-core 0.16.1, torch 2.13 CPU):

1. ``device=torch.cuda.current_device()`` in about 175 call sites (tensor_parallel layers and
   mappings, MoE router and experts, GlobalMemoryBuffer, DDP's buffers), several of them inside
   autograd functions' backward: ``torch.cuda.current_device()`` returns ``torch.device("cpu")``.
   The remaining uses of it in 0.16.1 (log messages, ``.cuda(device)``, ``.to(device)``) accept
   a device object. ``torch.cuda.set_device`` does nothing.
2. Literal ``device="cuda"`` / ``Tensor.cuda()`` / ``Tensor.to("cuda")`` / ``pin_memory=True``
   (pipeline schedules' ``total_num_tokens``, DDP's warm-up tensor, dist_checkpointing exchange
   utils, attention-mask helpers, the rerun state machine): a
   :class:`torch.overrides.TorchFunctionMode` maps any CUDA device to ``cpu`` and drops pinning.
   It is entered on the calling thread. A mode is off while its own handler runs, and
   ``torch.autograd.backward`` / ``grad`` are torch functions, so the autograd engine would run
   Python backward code (activation recomputation re-running a layer's forward, which builds a
   causal mask with ``device="cuda"``) without it: ``torch.autograd._engine_run_backward``, the
   plain function that enters the C++ engine, is wrapped to run under the mode.
3. ``torch.cuda.Stream`` / ``Event`` / ``current_stream`` / ``stream`` / ``synchronize``
   (MoELayer's shared-expert stream, the alltoall dispatcher's device-to-host stream and events,
   DDP's communication stream): CPU work is synchronous, so these become inert stand-ins.
4. The CUDA RNG (``torch.cuda.manual_seed`` / ``get_rng_state`` / ``set_rng_state`` and
   ``tensor_parallel.random._set_cuda_rng_state``), which the model-parallel RNG tracker forks
   for dropout in tensor-parallel regions: on CPU every kernel draws from the CPU default
   generator, so the "device" generator IS the CPU default generator. Forking the tracker then
   really switches the stream that CPU dropout draws from: per-TP-rank inside ``fork()``, the
   data-parallel seed outside it, exactly Megatron's layout. The tracker's warning "CPU RNG state
   changed within GPU RNG context" is then expected and filtered.
5. ``moe_utils.te_general_gemm`` is referenced but undefined when transformer-engine is missing
   (NameError in ``RouterGatingLinearFunction``, a bug in 0.16.1): define it as ``None``.
6. The alltoall dispatcher turns its split sizes into numpy arrays only for CUDA tensors
   (``maybe_move_tensor_to_cpu`` checks ``is_cuda``); ``all_to_all_single`` rejects tensors as
   split sizes, so CPU tensors are converted too.
7. ``moe_grouped_gemm`` with the local (non-TE) spec builds the legacy ``GroupedMLP``, whose
   ``grouped_gemm`` kernel package is CUDA-only: ``grouped_gemm_util`` gets a CPU ``gmm`` (one
   matmul per expert over its rows), so that grouped-GEMM experts, and the ``moe_act`` selective
   recompute that only they implement, run on CPU.
8. Selective recompute of ``layernorm`` / ``moe_act`` fails without Transformer Engine
   (:mod:`megatron_ext.compat.recompute`, a bug in 0.16.1 on GPU too): fixed here.

Megatron's optimizer wrappers check for ``torch.cuda.*Tensor`` types and are not patched here:
the CPU path uses :mod:`megatron_ext.optim` instead.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON_CORE = "0.16.1"

_lock = threading.Lock()
_active = False
_mode: "_CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps every CUDA device named in a torch call to the CPU (point 2 above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.to and len(args) > 1:
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _Event:
    """Inert torch.cuda.Event: CPU work is complete when the Python call returns."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _Stream:
    """Inert torch.cuda.Stream (point 3)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _Stream)

    def __hash__(self):
        return 0


_DEFAULT_STREAM = _Stream()


@contextmanager
def _stream_context(stream=None):
    yield


def _grouped_matmul(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False):
    """``grouped_gemm.ops.gmm`` on CPU (point 7): rows ``a[start_e : start_e + batch_sizes[e]]``
    times ``b[e]`` (``b[e]^T`` with ``trans_b``), for every expert e in order."""
    rows = a.split([int(n) for n in batch_sizes.tolist()])
    return torch.cat([part @ (weight.t() if trans_b else weight) for part, weight in zip(rows, b)])


class _CpuGroupedGemm:
    """Stands in for the ``grouped_gemm`` package (point 7): ``ops.gmm`` is all Megatron calls."""

    class ops:
        gmm = staticmethod(_grouped_matmul)


class _DropForkWarning(logging.Filter):
    """Point 4: on CPU the forked stream is the CPU generator, so it changes by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _check_version() -> None:
    from megatron.core import package_info

    if package_info.__version__ != SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron_ext's CPU support was written for megatron-core {SUPPORTED_MEGATRON_CORE}, "
            f"but megatron-core {package_info.__version__} is installed. Install the pinned "
            f"version (pip install megatron-core=={SUPPORTED_MEGATRON_CORE}) or run on a GPU, "
            "where this layer is not used."
        )


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = lambda device: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = _stream_context
    cuda.synchronize = lambda device=None: None
    # Point 4: the CUDA RNG is the CPU default generator.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


def _patch_autograd_engine(mode: TorchFunctionMode) -> None:
    import torch.autograd
    import torch.autograd.graph

    engine_run_backward = torch.autograd.graph._engine_run_backward

    def run_backward_under_mode(*args, **kwargs):
        with mode:
            return engine_run_backward(*args, **kwargs)

    torch.autograd._engine_run_backward = run_backward_under_mode
    torch.autograd.graph._engine_run_backward = run_backward_under_mode


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import grouped_gemm_util, moe_utils, token_dispatcher

    from megatron_ext.compat.recompute import fix_recompute_without_te

    def set_cpu_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._set_cuda_rng_state = set_cpu_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_DropForkWarning())

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    def move_splits_to_numpy(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.cpu().numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = move_splits_to_numpy

    if not grouped_gemm_util.grouped_gemm_is_available():
        grouped_gemm_util.grouped_gemm = _CpuGroupedGemm
        grouped_gemm_util.ops = _CpuGroupedGemm.ops

    fix_recompute_without_te()


def enable_cpu_support() -> bool:
    """Activate the CPU redirections in this process (and thread); idempotent.

    Returns True when the CPU path is active, False when CUDA is available (nothing is changed).
    Raises RuntimeError if the installed megatron-core is not the version this was written for.
    """
    global _active, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _active:
            _enter_mode_on_this_thread()
            return True
        # Expected on CPU, and printed once per import by every rank: keep logs readable.
        warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex|Apex is not installed)")
        warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS")
        _check_version()
        _patch_torch_cuda()
        _patch_megatron()
        _mode = _CudaToCpuMode()
        _patch_autograd_engine(_mode)
        _active = True
        _enter_mode_on_this_thread()
    return True


def _enter_mode_on_this_thread() -> None:
    from torch.overrides import _get_current_function_mode_stack

    if not any(isinstance(m, _CudaToCpuMode) for m in _get_current_function_mode_stack()):
        _mode.__enter__()


@contextmanager
def cuda_redirect_suspended():
    """Run the block without the torch-function mode of point 2 on this thread.

    Under the mode every torch call, whatever library makes it, first goes through a Python
    ``__torch_function__``: a cached decode step spent 11% of its self time there. This is for code
    known to name no CUDA device literally; the decoder's cached steps are such code, and the tests
    run them here. It is a no-op where the mode is not the innermost one (or CPU support is off).
    """
    from torch.overrides import _get_current_function_mode_stack, _pop_mode, _push_mode

    stack = _get_current_function_mode_stack()
    if not stack or not isinstance(stack[-1], _CudaToCpuMode):
        yield
        return
    mode = _pop_mode()
    try:
        yield
    finally:
        _push_mode(mode)


def cpu_support_active() -> bool:
    """Whether :func:`enable_cpu_support` redirected CUDA to the CPU in this process."""
    return _active
