"""Sub-model extraction: a standalone smaller model from an elastic MoE checkpoint.

A sub-network (kept layers, kept experts, top-k) of the trained model is written as a model of
its own: layers renumbered 0..n-1, every MoE layer keeping only the chosen experts (their MLP
weights, the router rows and expert-bias entries, renumbered in order) and the new top-k. Because
elastic training ran exactly these sub-networks (a skipped layer is the identity; routing
restricted to a subset is top-k over that subset's scores), the extracted model computes the same
function as the full model under :func:`megatron_ext.moe.elastic.apply` of the same sub-network.

A hybrid-attention model (after binarization) keeps its kept layers' rows of the allocation: the
sub-model is a static hybrid with its own allocation.json. A looping model keeps its kept layers'
loops: the SGT schedule's state, renumbered, goes into the sub-model's checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_ext.config.schema import RunConfig
from megatron_ext.models.builder import moe_layer_pattern
from megatron_ext.moe.elastic import SubNetwork

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)\.(.*)$")
_PER_EXPERT_ROWS = ("mlp.router.weight", "mlp.router.bias", "mlp.router.expert_bias")


def check_subnetwork(cfg: RunConfig, sub: SubNetwork) -> None:
    """Raise ValueError unless ``sub`` is a sub-network of ``cfg``'s model that we can extract."""
    problems = []
    n, e = cfg.model.num_layers, cfg.moe.num_experts
    if not cfg.moe.enabled:
        problems.append("the model has no MoE layers (moe.enabled is false)")
    if not sub.layers or any(not 0 <= i < n for i in sub.layers) or list(sub.layers) != sorted(set(sub.layers)):
        problems.append(f"layers {list(sub.layers)} must be distinct, ascending indices in [0, {n})")
    experts = list(sub.experts) if sub.experts is not None else list(range(e))
    if any(not 0 <= x < e for x in experts) or experts != sorted(set(experts)):
        problems.append(f"experts {experts} must be distinct, ascending indices in [0, {e})")
    elif not 1 <= sub.top_k <= len(experts):
        problems.append(f"top-k {sub.top_k} must be in [1, {len(experts)}] (the kept experts)")
    if problems:
        raise ValueError("cannot extract the sub-network: " + "; ".join(problems))


def unsharded(cfg: RunConfig) -> RunConfig:
    """``cfg`` for one process: no parallelism, no elastic sampling, weights-only loading."""
    single = copy.deepcopy(cfg)
    single.parallel = type(cfg.parallel)()
    single.elastic.enabled = False
    single.checkpoint.load_optimizer = False
    return single


def subnetwork_config(cfg: RunConfig, sub: SubNetwork, allocation: Optional[Path] = None) -> RunConfig:
    """The run config of the extracted model (unsharded; weights-only loading; no elastic).

    A hybrid-attention model becomes a static hybrid that reads ``allocation`` (the kept layers'
    rows of the trained allocation).
    """
    small = unsharded(cfg)
    pattern = moe_layer_pattern(cfg)
    small.model.num_layers = len(sub.layers)
    small.moe.layer_pattern = [pattern[i] for i in sub.layers]
    if sub.experts is not None:
        small.moe.num_experts = len(sub.experts)
    small.moe.top_k = sub.top_k
    small.name = f"{cfg.name}-sub"
    if cfg.hybrid_attention.enabled:
        if allocation is None:
            raise ValueError("a hybrid-attention model's sub-model needs the path of its allocation")
        small.hybrid_attention = dataclasses.replace(
            small.hybrid_attention, method="static", allocation=str(allocation), mask_learning_steps=None,
            mask_learning_tokens=None)
    if cfg.looping.enabled:
        layer_map = {old: new for new, old in enumerate(sub.layers)}
        small.looping = dataclasses.replace(
            small.looping, exclude_layers=[layer_map[i] for i in cfg.looping.exclude_layers if i in layer_map])
    return small


def subnetwork_loop_state(state: Dict, sub: SubNetwork, source_step: int) -> Dict:
    """The SGT callback state of the sub-model: the kept layers' loops (depth, kept heads, fade)
    renumbered, and steps shifted so that the sub-model's step 0 is the source's ``source_step``
    (a fade in progress continues where it was). Loops of dropped layers go with them."""
    layer_map = {old: new for new, old in enumerate(sub.layers)}

    def kept(table: Dict) -> Dict:
        return {layer_map[int(layer)]: value for layer, value in table.items() if int(layer) in layer_map}

    schedule = state["scheduler"]
    window_end = schedule["window_end"]
    return {
        "scheduler": {
            "selected": [layer_map[int(layer)] for layer in schedule["selected"] if int(layer) in layer_map],
            "depth": kept(schedule["depth"]),
            "kept": kept(schedule["kept"]),
            "selected_at": {layer: int(step) - source_step for layer, step in kept(schedule["selected_at"]).items()},
            "window_end": None if window_end is None else int(window_end) - source_step,
            "frozen": schedule["frozen"],
        },
        "tracker": {"layers": list(range(len(sub.layers))), "num_heads": state["tracker"]["num_heads"],
                    "ema": kept(state["tracker"]["ema"])},
        "history": [],
        "events": [],
    }


def trained_allocation(callbacks: list, checkpoint: Path) -> torch.Tensor:
    """The ``[num_layers, units]`` allocation of a restored hybrid model; refuses one still
    learning its mask (gated attention has no static sub-model)."""
    (consa,) = [cb for cb in callbacks if cb.name == "consa"]
    if consa.allocation is None:
        raise ValueError(f"{checkpoint} is from mask learning (hybrid_attention stage 1: step <= "
                         f"{consa.stage_steps}), whose attention is gated, not static: extract from a "
                         "checkpoint saved after binarization")
    return consa.allocation


def subnetwork_state_dict(full: Dict[str, torch.Tensor], sub: SubNetwork, num_experts: int) -> Dict[str, torch.Tensor]:
    """Select and renumber the tensors of ``sub`` from a full model's unsharded state dict."""
    layer_map = {old: new for new, old in enumerate(sub.layers)}
    experts: List[int] = list(sub.experts) if sub.experts is not None else list(range(num_experts))
    expert_map = {old: new for new, old in enumerate(experts)}
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        match = _LAYER.match(name)
        if match is None:  # embedding, final norm, output layer
            out[name] = tensor
            continue
        layer, rest = int(match.group(1)), match.group(2)
        if layer not in layer_map:
            continue
        expert = _EXPERT.match(rest)
        if expert is not None:
            if int(expert.group(2)) not in expert_map:
                continue
            rest = f"{expert.group(1)}{expert_map[int(expert.group(2))]}.{expert.group(3)}"
        elif rest in _PER_EXPERT_ROWS and tensor is not None and tensor.shape[0] == num_experts:
            tensor = tensor[experts].clone()
        out[f"decoder.layers.{layer_map[layer]}.{rest}"] = tensor
    return out


def extract_submodel(run_dir: Path, output: Path, sub: SubNetwork, step: Optional[int] = None) -> Path:
    """Load ``run_dir``'s checkpoint (latest or ``step``), write the sub-model to ``output``."""
    from megatron_ext.config import dump_yaml, load_config
    from megatron_ext.consa.allocation import write_allocation
    from megatron_ext.models.builder import build_model
    from megatron_ext.training.capabilities import restore_capabilities
    from megatron_ext.training.checkpoint import CheckpointManager

    cfg = load_config(run_dir / "config.yaml")
    check_subnetwork(cfg, sub)
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=1)
    path = manager.latest() if step is None else run_dir / "checkpoints" / f"step_{step:08d}"
    if path is None or not path.is_dir():
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {run_dir / 'checkpoints'}")
    single = unsharded(cfg)
    (full,) = build_model(single, cuda=False)
    common = manager.load(path, [full], None, load_optimizer=False)
    callbacks = restore_capabilities(single, [full], common, run_dir)
    allocation_path = output.resolve() / "allocation.json"
    kept_allocation = None
    if cfg.hybrid_attention.enabled:
        kept_allocation = trained_allocation(callbacks, path)[list(sub.layers)]
    small_cfg = subnetwork_config(cfg, sub, allocation_path if kept_allocation is not None else None)
    small_state = subnetwork_state_dict(full.state_dict(), sub, cfg.moe.num_experts)
    output.mkdir(parents=True, exist_ok=True)
    if dist.get_rank() == 0:
        if kept_allocation is not None:  # the sub-model's config points here
            h = cfg.hybrid_attention
            write_allocation(allocation_path, kept_allocation, granularity=h.granularity, window=h.window,
                             target=h.target, method=f"{h.method} (layers {list(sub.layers)} of {run_dir.name})")
    dist.barrier()
    (small,) = build_model(small_cfg, cuda=False)
    small.load_state_dict(small_state, strict=True)
    if dist.get_rank() == 0:
        dump_yaml(small_cfg, output / "config.yaml")
    loop_states = {}
    if cfg.looping.enabled:
        (sgt,) = [cb for cb in callbacks if cb.name == "sgt"]
        loop_states["sgt"] = subnetwork_loop_state(sgt.state_dict(), sub, common["step"])
    sub_common = {"consumed_samples": 0, "skipped_steps": 0, "scheduler": None, "callbacks": loop_states,
                  "extracted_from": {"run_dir": str(run_dir), "checkpoint": path.name, "layers": list(sub.layers),
                                     "experts": None if sub.experts is None else list(sub.experts),
                                     "top_k": sub.top_k}}
    return CheckpointManager(output / "checkpoints", keep_last=1).save(0, [small], None, sub_common)
