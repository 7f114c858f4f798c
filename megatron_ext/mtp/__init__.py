"""Multi-token prediction (Megatron-Core's MTP block) as a capability."""
