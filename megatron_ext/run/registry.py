"""The registered capabilities, in the order their hooks run (config sections, layer-spec rewrites,
callbacks). Adding a method: its package with a :class:`~megatron_ext.capability.Capability`, and
one line here."""

from megatron_ext.consa.capability import HybridAttention
from megatron_ext.moe.capability import MixtureOfExperts
from megatron_ext.mtp.capability import MultiTokenPrediction
from megatron_ext.sgt.capability import Looping

CAPABILITIES = (
    HybridAttention(),
    MixtureOfExperts(),
    Looping(),
    MultiTokenPrediction(),
)
