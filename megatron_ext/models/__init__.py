"""Model building blocks: layer specs on Megatron's seams, norms, and (later) the model builder."""
