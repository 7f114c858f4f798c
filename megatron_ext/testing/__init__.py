"""Test utilities: a pool of gloo ranks that runs test bodies under Megatron's parallel state."""
