"""SGT (arXiv 2603.23998): training-time sparse attention looping grown from deep to shallow layers.

The model-side modules import Megatron-Core and are imported from their own files:
``megatron_ext.sgt.looped_layer`` (LoopedTransformerLayer, looped_layer_spec) and
``megatron_ext.sgt.callback`` (SGTCallback). This package exports the light pieces only, so that
the run config can import :class:`LoopingConfig` without pulling in the model.
"""

from megatron_ext.sgt.config import LoopingConfig
from megatron_ext.sgt.entropy import EntropyTracker, last_query_entropy
from megatron_ext.sgt.flops import GPTShape, LoopedLayer, LoopStructure, flops_overhead
from megatron_ext.sgt.scheduler import Event, GrowthConfig, GrowthScheduler

__all__ = [
    "EntropyTracker",
    "Event",
    "GPTShape",
    "GrowthConfig",
    "GrowthScheduler",
    "LoopStructure",
    "LoopedLayer",
    "LoopingConfig",
    "flops_overhead",
    "last_query_entropy",
]
