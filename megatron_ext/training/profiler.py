"""A torch.profiler window (``logging.profile``) and named regions for the project's own modules.

During steps ``start_step`` .. ``start_step + steps - 1`` each rank of ``ranks`` records a trace
(CPU operators, and CUDA kernels on GPU) and writes it to
``<run-dir>/profile/rank<r>.<step>.pt.trace.json`` (Chrome trace format: Perfetto, chrome://tracing,
or TensorBoard's profiler plugin pointed at ``<run-dir>/profile``). On GPU the window is also a set
of NVTX ranges (``step <n>`` and, through ``emit_nvtx``, every operator) for ``nsys profile``.

So that a trace reads by method, every module of the model defined in this project
(``megatron_ext.*``: the hybrid attention, the looped layers, the routers ...) runs inside a
``record_function`` region named ``<package>/<Class>`` (``sgt/LoopedTransformerLayer``), and
Megatron-Core's MoE layer's ``route`` / ``dispatch`` / ``routed_experts_compute`` / ``combine``
phases get regions of their own. The regions exist during the window only (forward hooks and
per-instance wrappers, removed when it closes): outside it the model runs untouched.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable, List, Optional

import torch

PHASES = ("route", "dispatch", "routed_experts_compute", "combine")
"""The methods of Megatron-Core's ``MoELayer`` that become regions ``MoELayer.<phase>``."""


def region_name(module: torch.nn.Module) -> Optional[str]:
    """``<package>/<Class>`` of a module defined in this project, else None."""
    parts = type(module).__module__.split(".")
    if parts[0] != "megatron_ext":
        return None
    return f"{parts[1] if len(parts) > 2 else parts[0]}/{type(module).__name__}"


class NamedRegions:
    """Record-function regions around the project's modules and the MoE layer's phases of ``model``."""

    def __init__(self, model: List[torch.nn.Module]):
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.handles = []
        self.wrapped = []
        for chunk in model:
            for module in chunk.modules():
                name = region_name(module)
                if name is not None:
                    self.handles.append(module.register_forward_pre_hook(functools.partial(self._enter, name)))
                    self.handles.append(module.register_forward_hook(self._exit, always_call=True))
                if isinstance(module, MoELayer):
                    for phase in PHASES:
                        method = getattr(module, phase, None)
                        if method is not None:
                            setattr(module, phase, self._region(f"MoELayer.{phase}", method))
                            self.wrapped.append((module, phase))

    @staticmethod
    def _region(name: str, method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(name):
                return method(*args, **kwargs)

        return wrapper

    @staticmethod
    def _enter(name, module, args):
        # A stack per module: a module called again inside itself (a looped layer) nests its regions.
        region = torch.profiler.record_function(name)
        region.__enter__()
        module.__dict__.setdefault("_profile_regions", []).append(region)

    @staticmethod
    def _exit(module, args, output):
        regions = module.__dict__.get("_profile_regions")
        if regions:
            regions.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module, phase in self.wrapped:
            del module.__dict__[phase]  # the class's method again
        self.handles, self.wrapped = [], []


class ProfilerWindow:
    """Starts the profiler before step ``start_step`` and writes the trace after the window's last step."""

    def __init__(self, profile, rank: int, run_dir: Path, model: List[torch.nn.Module], log: Callable[[str], None]):
        self.cfg, self.rank, self.model, self.log = profile, rank, model, log
        self.first, self.last = profile.start_step, profile.start_step + profile.steps - 1
        self.active = profile.steps > 0 and rank in profile.ranks
        self.out_dir = Path(run_dir) / "profile"
        self.cuda = torch.cuda.is_available()
        self.profiler = None
        self.contexts = contextlib.ExitStack()

    def begin_step(self, step: int) -> None:
        """Called before step ``step`` (1-based) starts."""
        if not self.active:
            return
        if step == self.first:
            self.start()
        if self.profiler is not None and self.cuda:
            torch.cuda.nvtx.range_push(f"step {step}")

    def end_step(self, step: int) -> None:
        if self.profiler is None:
            return
        if self.cuda:
            torch.cuda.nvtx.range_pop()
        self.profiler.step()
        if step == self.last:
            self.stop(step)

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.regions = NamedRegions(self.model)
        self.profiler = profile(
            activities=activities, record_shapes=self.cfg.record_shapes, profile_memory=self.cfg.memory
        )
        if self.cuda:
            self.contexts.enter_context(torch.autograd.profiler.emit_nvtx(record_shapes=self.cfg.record_shapes))
            torch.cuda.profiler.start()  # nsys --capture-range=cudaProfilerApi records the window alone
        self.profiler.start()

    def stop(self, step: int) -> None:
        self.profiler.stop()
        if self.cuda:
            torch.cuda.profiler.stop()
        self.contexts.close()
        self.regions.remove()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{self.rank}.{step}.pt.trace.json"
        self.profiler.export_chrome_trace(str(path))
        self.profiler = None
        self.log(f"rank {self.rank}: profiler trace of steps {self.first}-{self.last} written to {path}")

    def close(self) -> None:
        """The run ended inside the window: write what was recorded."""
        if self.profiler is not None:
            self.stop(self.last)
