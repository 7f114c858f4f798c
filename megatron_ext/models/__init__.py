"""Model building blocks, typed by the core config sections: layer specs on Megatron's seams, norms,
attention kernels (dense reference, blocked, fused), rotary embeddings, FLOP formulas. The run
assembly that puts them together for a run config is :mod:`megatron_ext.run`."""
