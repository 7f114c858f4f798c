"""Torch RMSNorm / LayerNorm that also work with Megatron's sequence parallelism.

Megatron's local fallback (``WrappedTorchNorm``) refuses ``sequence_parallel``; Apex / TE norms
are GPU-only. Under sequence parallelism a norm sees only its rank's slice of the sequence, so its
weight gradient is a partial sum: Megatron's ``finalize_model_grads`` all-reduces it over the
tensor-parallel group for every parameter marked ``sequence_parallel = True``, which is all this
class adds (Apex's FusedLayerNorm does the same).
"""

import torch


class Norm:
    """Build ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm`` per ``config.normalization``.

    A class whose ``__new__`` returns the torch module, so that it can stand in a ``ModuleSpec``
    and be called as Megatron calls norms: ``Norm(config=..., hidden_size=..., eps=...)``.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r} is not supported: use 'RMSNorm' or 'LayerNorm'.")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the torch norms.")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
