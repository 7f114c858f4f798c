"""Sub-model extraction: a standalone smaller model from a checkpoint.

A sub-network of the trained model (kept ``layers``; with MoE also kept ``experts`` and a
``top_k``; see :class:`~megatron_ext.moe.elastic.SubNetwork`) is written as a model of its own:
layers renumbered 0..n-1, and whatever each enabled capability contributes for the kept layers
(:meth:`Capability.submodel_config`, :meth:`~Capability.submodel_tensor`,
:meth:`~Capability.submodel_state`: MoE keeps the chosen experts' weights and router rows, hybrid
attention the kept layers' allocation, looping their loops). Because elastic training ran exactly
these sub-networks (a skipped layer is the identity; routing restricted to a subset is top-k over
that subset's scores), the extracted model computes the same function as the full model under
:func:`megatron_ext.moe.elastic.apply` of the same sub-network.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_ext.run import CAPABILITIES, RunConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def parse_indices(text: str, what: str) -> tuple:
    """``'0,2,5-7'`` -> ``(0, 2, 5, 6, 7)``: the layers or experts of a sub-network on the command line.
    ``what`` (e.g. ``'--layers'``) names the option in the ValueError that anything else raises: an
    empty list, a part that is not a non-negative integer or a range ``lo-hi`` with ``lo <= hi``."""
    if not str(text).strip():
        raise ValueError(f"{what} is empty: give at least one index or range, e.g. '0-3,6'")
    out = []
    for part in str(text).split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(
                f"{what} {text!r}: {part.strip()!r} is not an index or a range; give non-negative indices and "
                "ranges such as '0-3,6'"
            )
        if dash and int(hi) < int(lo):
            raise ValueError(
                f"{what} {text!r}: the range {part.strip()!r} is empty; write it low-high, e.g. '{hi}-{lo}'"
            )
        out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    return tuple(out)


def subnetwork_of(cfg: RunConfig, layers, experts, top_k):
    """The :class:`~megatron_ext.moe.elastic.SubNetwork` that ``layers`` / ``experts`` (ranges such as
    ``0-3,6``) and ``top_k`` name, checked against ``cfg``; None when none is given."""
    if layers is None and experts is None and top_k is None:
        return None
    from megatron_ext.moe.elastic import SubNetwork

    kept = parse_indices(layers, "layers") if layers is not None else tuple(range(cfg.model.num_layers))
    sub = SubNetwork(
        kept, parse_indices(experts, "experts") if experts is not None else None, None if top_k is None else int(top_k)
    )
    check_subnetwork(cfg, sub)
    return sub


def check_subnetwork(cfg: RunConfig, sub) -> None:
    """Raise ValueError unless ``sub`` is a sub-network of ``cfg``'s model that can be extracted."""
    n = cfg.model.num_layers
    problems = []
    layers = list(sub.layers)
    if not layers:
        problems.append("no layers are kept: keep at least one")
    outside = sorted({i for i in layers if not 0 <= i < n})
    if outside:
        problems.append(f"layers {layers}: {outside} are not layers of this {n}-layer model (its layers are 0-{n - 1})")
    if layers != sorted(set(layers)):
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        problems.append(
            f"layers {layers} "
            + (f"repeat {repeated}" if repeated else "are not ascending")
            + ": give each kept layer once, in ascending order"
        )
    for capability in CAPABILITIES:
        problems.extend(capability.check_submodel(cfg, sub))
    if problems:
        raise ValueError("cannot extract the sub-network: " + "; ".join(problems))


def subnetwork_state_dict(cfg: RunConfig, full: Dict[str, torch.Tensor], sub) -> Dict[str, torch.Tensor]:
    """Select and renumber the tensors of ``sub`` from a full model's unsharded state dict."""
    layer_map = {old: new for new, old in enumerate(sub.layers)}
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        match = _LAYER.match(name)
        if match is None:  # embedding, final norm, output layer
            out[name] = tensor
            continue
        layer, kept = int(match.group(1)), (match.group(2), tensor)
        if layer not in layer_map:
            continue
        for capability in cfg.capabilities:
            kept = capability.submodel_tensor(cfg, kept[0], kept[1], sub)
            if kept is None:
                break
        if kept is not None:
            out[f"decoder.layers.{layer_map[layer]}.{kept[0]}"] = kept[1]
    return out


def extract_submodel(run_dir: Path, output: Path, sub, step: Optional[int] = None) -> Path:
    """Load ``run_dir``'s checkpoint (latest or ``step``), write the sub-model to ``output`` (its
    config.yaml, the files its capabilities need, and a step-0 checkpoint); returns the checkpoint."""
    from megatron_ext.config import dump_yaml
    from megatron_ext.run.builder import build_model, unsharded
    from megatron_ext.run.schedule import trained_config
    from megatron_ext.training.checkpoint import CheckpointManager, CommonState
    from megatron_ext.training.evaluate import load_trained

    cfg = trained_config(run_dir, step)
    check_subnetwork(cfg, sub)
    # The sub-model keeps the run's checkpoint settings, load_optimizer included: its step-0 checkpoint
    # records that it holds no optimizer state, so only its own later checkpoints restore one.
    single = unsharded(cfg)
    (full,), callbacks, common = load_trained(single, run_dir, step)

    output.mkdir(parents=True, exist_ok=True)
    small_cfg = copy.deepcopy(single)
    small_cfg.name = f"{cfg.name}-sub"
    small_cfg.model.num_layers = len(sub.layers)
    is_writer = dist.get_rank() == 0
    states = {}
    for capability in cfg.capabilities:
        capability.submodel_config(cfg, small_cfg, sub, output)
        callback = callbacks.get(capability.name)
        state = capability.submodel_state(cfg, callback, sub, common.step, output, is_writer)
        if state is not None:
            states[callback.name] = state
    dist.barrier()  # files the sub-model's config points to are written
    small_state = subnetwork_state_dict(cfg, full.state_dict(), sub)
    (small,) = build_model(small_cfg, cuda=False)
    small.load_state_dict(small_state, strict=True)
    if is_writer:
        dump_yaml(small_cfg, output / "config.yaml")
    sub_common = CommonState(
        callbacks=states,
        extracted_from={
            "run_dir": str(run_dir),
            "checkpoint": f"step_{common.step:08d}",
            "layers": list(sub.layers),
            "experts": None if sub.experts is None else list(sub.experts),
            "top_k": sub.top_k,
        },
    )
    return CheckpointManager(output / "checkpoints", keep_last=1).save(0, [small], None, sub_common)
