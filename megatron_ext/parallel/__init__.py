"""Process groups and Megatron parallel state: set up, tear down, and move full weights in and
out of tensor-parallel shards."""

from megatron_ext.parallel.state import ParallelSizes, destroy_parallel_state, initialize_parallel_state
from megatron_ext.parallel.weights import full_named_tensors, load_full_named_tensors, main_grad_or_grad

__all__ = [
    "ParallelSizes",
    "destroy_parallel_state",
    "full_named_tensors",
    "initialize_parallel_state",
    "load_full_named_tensors",
    "main_grad_or_grad",
]
