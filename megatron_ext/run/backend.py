"""Which module backend a run builds: Megatron's local modules or Transformer Engine (``model.backend``).

``local`` is what runs on CPU (and on a GPU without Transformer Engine): Megatron-Core's local
linears, this project's norms (:mod:`~megatron_ext.models.norm`) and attention kernels
(:mod:`~megatron_ext.models.kernels`). ``te`` builds the layers from Transformer Engine modules (see
:func:`~megatron_ext.models.layer_spec.gpt_layer_spec`). ``auto`` picks ``te`` where it can run: on a
GPU, with Transformer Engine importable, and no enabled feature that needs the local modules.

The choice is resolved once, before the model is built (:func:`resolve`), and handed to the
capabilities' spec rewrites; tools that work on weights by name (HF import / export, sub-model
extraction, parameter counts) build on the CPU and so always get ``local``, whose names a TE model's
checkpoints also use.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, List, Optional

from megatron_ext.models.backend import fp8_size_problems, te_import_error

if TYPE_CHECKING:
    from megatron_ext.run.config import RunConfig


def te_unsupported(cfg: RunConfig) -> List[str]:
    """What in ``cfg`` needs the local modules (empty: the TE backend can build it): the core's, then
    each enabled capability's :meth:`~megatron_ext.capability.Capability.te_unsupported`."""
    reasons = []
    if cfg.parallel.context > 1:
        reasons.append(
            f"parallel.context={cfg.parallel.context} (context-parallel attention is this "
            "project's exchange around the local kernels)"
        )
    if cfg.data.reset_attention_mask:
        reasons.append(
            "data.reset_attention_mask (document masking is this project's mask over the local kernels; "
            "Transformer Engine would take packed sequences instead)"
        )
    for capability in cfg.capabilities:
        reasons.extend(capability.te_unsupported(cfg))
    return reasons


def fp8_config(cfg: RunConfig) -> dict:
    """``TransformerConfig`` keywords of ``train.precision: fp8`` [choice]: Transformer Engine's ``hybrid``
    format (E4M3 weights and activations, E5M2 gradients) with delayed scaling over a 1024-step amax
    history, its maximum taken (the recipe of NeMo's and Megatron-LM's FP8 examples on H100)."""
    if cfg.train.precision != "fp8":
        return {}
    return dict(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1024, fp8_amax_compute_algo="max")


def resolve_backend(cfg: RunConfig, cuda: bool) -> str:
    """``local`` or ``te`` for a model built here, on GPU (``cuda``) or CPU."""
    return _resolve_backend(cfg, cuda, te_import_error() if cfg.model.backend == "auto" else None)


def _resolve_backend(cfg: RunConfig, cuda: bool, te_error: Optional[str]) -> str:
    """:func:`resolve_backend` where Transformer Engine imports (``te_error`` None) or fails to."""
    if cfg.model.backend != "auto":
        return cfg.model.backend
    if cuda and te_error is None and not te_unsupported(cfg):
        return "te"
    return "local"


def resolve(cfg: RunConfig, cuda: bool) -> RunConfig:
    """``cfg`` with ``model.backend`` resolved (``local`` or ``te``); ``cfg`` itself when it already is."""
    backend = resolve_backend(cfg, cuda)
    if backend == cfg.model.backend:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend=backend))


def backend_problems(cfg: RunConfig, cuda: bool, *, te_installed: Optional[bool] = None) -> List[str]:
    """Problems of ``model.backend`` / ``train.precision: fp8`` for a run on GPU (``cuda``) or CPU.
    ``te_installed``: whether Transformer Engine imports where the job runs (default: here)."""
    problems = []
    if te_installed is None:
        te_error = te_import_error()
    else:
        te_error = None if te_installed else "not installed"
    fp8 = cfg.train.precision == "fp8"
    if cfg.model.backend == "te":
        if not cuda:
            problems.append(
                "model.backend='te' needs a GPU (Transformer Engine runs on CUDA): use 'local' or 'auto' on CPU"
            )
        elif te_error:
            problems.append(
                f"model.backend='te' but Transformer Engine does not import ({te_error}): "
                "pip install 'transformer-engine[pytorch]' (the extra 'gpu'), or use 'local'"
            )
        for reason in te_unsupported(cfg):
            problems.append(f"model.backend='te' with {reason}: use model.backend 'local' or 'auto'")
    if fp8:
        if not cuda:
            problems.append("train.precision='fp8' needs a GPU with Transformer Engine: use 'fp32' or 'auto' on CPU")
        elif _resolve_backend(cfg, cuda, te_error) == "local":
            why = f" ({te_error})" if cfg.model.backend == "auto" and te_error else ""
            problems.append(
                f"train.precision='fp8' runs Transformer Engine's FP8 GEMMs: it needs model.backend 'te' "
                f"(here the backend is local{why})"
            )
        m = cfg.model
        sizes = {"model.hidden_size": m.hidden_size, "model.ffn_hidden_size": m.ffn_hidden_size}
        problems.extend(fp8_size_problems(sizes))
    return problems
