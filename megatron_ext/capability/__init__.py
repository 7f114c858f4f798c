"""The protocol between the generic stack and its methods: :class:`Capability`, and the training
callbacks through which a capability acts during a run."""

from megatron_ext.capability.base import BatchHook, Capability
from megatron_ext.capability.callbacks import Callback, TrainContext

__all__ = ["BatchHook", "Callback", "Capability", "TrainContext"]
