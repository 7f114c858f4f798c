"""ERNIE 5.0 MoE (arXiv 2602.04705): modality-agnostic routing with expert bias, elastic training,
load statistics.

The model-side modules import Megatron-Core and are imported from their own files:
``megatron_ext.moe.router`` (ElasticRouter, ModalityIsolatedRouter, with_router,
set_modality_ids) and ``megatron_ext.moe.callback`` (MoECallback). This package exports the light
pieces only, so that the run config can import its sections without pulling in the model.
"""

from megatron_ext.moe.config import ElasticConfig, RoutingConfig
from megatron_ext.moe.elastic import ElasticSampler, SubNetwork
from megatron_ext.moe.stats import load_cv, normalized_entropy, top_experts, top_experts_iou

__all__ = [
    "ElasticConfig",
    "ElasticSampler",
    "RoutingConfig",
    "SubNetwork",
    "load_cv",
    "normalized_entropy",
    "top_experts",
    "top_experts_iou",
]
