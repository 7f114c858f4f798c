"""Selective recompute of ``layernorm`` / ``moe_act`` without Transformer Engine (megatron-core 0.16.1).

``TransformerConfig(recompute_granularity="selective", recompute_modules=[..."layernorm",
"moe_act"...])`` makes ``TransformerLayer`` (both norms) and the grouped-GEMM experts (the
activation) recompute through ``tensor_parallel.CheckpointWithoutOutput()``. In megatron-core
0.16.1 its ``__init__(self, fp8=False)`` sets ``self.fp8 = fp8 is not None``, which is True for
the default ``fp8=False``; the forward then takes the FP8 path and calls Transformer Engine's
``FP8GlobalStateManager``, which ``tensor_parallel.random`` imports only when TE is installed.
Without TE every such forward fails with ``NameError: name 'FP8GlobalStateManager' is not
defined``.

Without TE there is no FP8 state to save or restore, so :func:`fix_recompute_without_te` makes
every new ``CheckpointWithoutOutput`` take the plain path (``fp8=False``), the same computation
Megatron recomputes on the non-FP8 path. With TE installed it changes nothing: Megatron's FP8 path
then works, and restores TE's FP8 state for the recomputation as intended. Applied by
:func:`~megatron_ext.compat.enable_cpu_support`; on a GPU without TE (where that does nothing)
call it before building the models.
"""

from __future__ import annotations

import functools

from megatron_ext.compat.internals import Internal, require

_RANDOM = "megatron.core.tensor_parallel.random"

INTERNALS = (
    Internal(_RANDOM, "HAVE_TE"),
    Internal(
        _RANDOM,
        "CheckpointWithoutOutput.__init__",
        parameters=("fp8",),
        source_contains=("self.fp8 = fp8 is not None",),
    ),
    Internal(
        _RANDOM,
        "CheckpointWithoutOutputFunction.forward",
        source_contains=("if checkpoint_without_output_obj.fp8:", "FP8GlobalStateManager"),
    ),
    Internal(_RANDOM, "CheckpointWithoutOutput._recompute", source_contains=("if self.fp8:",)),
)
"""Every Megatron-Core internal this module relies on."""


def fix_recompute_without_te() -> bool:
    """Make ``CheckpointWithoutOutput`` skip its FP8 path when TE is absent; idempotent.

    Returns True when the fix is in place, False when TE is installed (nothing is changed).
    """
    from megatron.core.tensor_parallel import random as mcore_random

    if mcore_random.HAVE_TE:
        return False
    init = mcore_random.CheckpointWithoutOutput.__init__
    if getattr(init, "_without_te", False):
        return True
    require("megatron_ext.compat.recompute.fix_recompute_without_te", INTERNALS)

    @functools.wraps(init)
    def init_without_fp8(self, fp8=False):
        init(self, fp8=fp8)
        self.fp8 = False  # no TE: no FP8 state to capture or restore

    init_without_fp8._without_te = True
    mcore_random.CheckpointWithoutOutput.__init__ = init_without_fp8
    return True
