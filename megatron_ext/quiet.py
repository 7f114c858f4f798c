"""Warnings the command-line tools hide by default, each with the reason it says nothing actionable.

``pretrain/__init__.py`` (and ``data/__init__.py``, for the data tools) installs these filters before
anything imports Megatron-Core or torch's distributed package, so that a tool prints its own lines
only. ``--verbose`` (any ``pretrain.*`` or ``data.*`` tool) or ``MEGATRON_EXT_VERBOSE=1`` shows them
again. The project's own warnings (a ConSA constraint that has not settled, a checkpoint fallback,
...) are never hidden.
"""

from __future__ import annotations

import os
import sys
import warnings

KNOWN = (
    # (message regex, category, why it is hidden)
    (
        r".*(Apex|Transformer Engine).* (is|are) not installed.*",
        UserWarning,
        "the CPU path uses torch's norms and optimizers by design; on GPU install the 'gpu' extra",
    ),
    (
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*",
        FutureWarning,
        "called inside megatron-core 0.16.1 (distributed checkpointing, DDP); nothing to change here",
    ),
    (
        r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load` instead\.",
        FutureWarning,
        "torch.distributed.checkpoint's, called inside megatron-core 0.16.1; nothing to change here",
    ),
    (
        r"Please use DTensor instead and we are deprecating ShardedTensor\.",
        FutureWarning,
        "torch's notice on the ShardedTensor that megatron-core 0.16.1's checkpoint loading builds; "
        "nothing to change here",
    ),
    (
        r"full scope is deprecated\. Use empty cuda_graph_scope.*",
        UserWarning,
        "megatron-core 0.16.1's own TransformerConfig default; CUDA graphs are not used",
    ),
    (
        r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1\. Disabling sequence parallel\.",
        UserWarning,
        "expert layers at expert_tensor = 1 in a sequence-parallel run: Megatron turns it off for them, as intended",
    ),
)
VERBOSE_ENV = "MEGATRON_EXT_VERBOSE"


def install(argv=None) -> bool:
    """Hide :data:`KNOWN` unless ``--verbose`` is in ``argv`` (removed from it) or the environment asks
    for them; returns whether they are hidden. Sets the environment so that spawned ranks agree."""
    argv = sys.argv if argv is None else argv
    if "--verbose" in argv:
        argv.remove("--verbose")
        os.environ[VERBOSE_ENV] = "1"
    if os.environ.get(VERBOSE_ENV, "0") not in ("", "0"):
        return False
    for message, category, _ in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
    return True
