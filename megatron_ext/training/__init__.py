"""One optimizer step over Megatron's pipeline schedules, shared by the training loop and tests."""
