"""Weight rules: how one tensor of our unsharded model maps to one or more HF tensors, both ways.

A rule names our tensor (its key in the unsharded model's ``state_dict``, i.e. TP = PP = EP = 1),
the HF tensors it corresponds to, and the two exact (copy-only) conversions. Rules are built per
layer by the core mapping (attention, norms, dense MLP) and by the capabilities that own a part of
a layer (:meth:`~megatron_ext.capability.Capability.hf_layer_rules`: the MoE layer's router and
experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch


@dataclass(frozen=True)
class Rule:
    ours: str
    """Our tensor's name in the unsharded model's state dict."""
    hf: Tuple[str, ...]
    """The HF tensors' names (without the ``model.`` / ``lm_head`` prefix handling: full names)."""
    to_hf: Callable[[torch.Tensor], Sequence[torch.Tensor]]
    """Our tensor -> the HF tensors, in the order of :attr:`hf`."""
    from_hf: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    """The HF tensors -> our tensor."""


def same(ours: str, hf: str) -> Rule:
    """One tensor, the same on both sides."""
    return Rule(ours, (hf,), lambda t: (t,), lambda ts: ts[0])


def concat(ours: str, hf: Sequence[str], sizes: Sequence[int], dim: int = 0) -> Rule:
    """Our tensor is the HF tensors concatenated along ``dim`` (e.g. SwiGLU's ``[gate; up]``)."""
    return Rule(
        ours, tuple(hf), lambda t: tuple(t.split(list(sizes), dim=dim)), lambda ts: torch.cat(list(ts), dim=dim)
    )


def stacked(ours: str, hf: Sequence[str]) -> Rule:
    """Our tensor is the HF tensors stacked along a new first axis (e.g. a packed expert tensor)."""
    return Rule(ours, tuple(hf), lambda t: tuple(t.unbind(0)), lambda ts: torch.stack(list(ts)))


def qkv(ours: str, q: str, k: str, v: str, *, heads: int, groups: int, head_dim: int) -> Rule:
    """Megatron's fused QKV weight: rows grouped per KV head, ``[q heads of the group, k, v]`` (which
    is what lets TP split it by contiguous rows); HF keeps three separate projections."""
    per_group = heads // groups

    def to_hf(t: torch.Tensor):
        g = t.reshape(groups, (per_group + 2) * head_dim, -1)
        wq, wk, wv = g.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return tuple(w.reshape(-1, t.shape[-1]) for w in (wq, wk, wv))

    def from_hf(ts):
        wq, wk, wv = ts
        hidden = wq.shape[-1]
        parts = (
            wq.reshape(groups, per_group * head_dim, hidden),
            wk.reshape(groups, head_dim, hidden),
            wv.reshape(groups, head_dim, hidden),
        )
        return torch.cat(parts, dim=1).reshape(-1, hidden)

    return Rule(ours, (q, k, v), to_hf, from_hf)


def vocab(ours: str, hf: str, rows: int, padded: int) -> Rule:
    """A vocabulary tensor: ours has ``padded`` rows (a multiple of 128), HF's the first ``rows``;
    the padding rows are zeros on import and dropped on export."""

    def from_hf(ts):
        (t,) = ts
        return torch.cat([t, t.new_zeros(padded - rows, *t.shape[1:])]) if padded > rows else t

    return Rule(ours, (hf,), lambda t: (t[:rows],), from_hf)


def constant(hf: str, shape: Sequence[int]) -> Rule:
    """A HF tensor with no counterpart here that must be zeros (e.g. dots1's routing bias of a model
    trained without one): written on export, required to be zeros on import."""

    def from_hf(ts):
        if bool(ts[0].any()):
            raise ValueError(f"{hf} is not zero; this model has no such tensor")
        return None

    return Rule("", (hf,), lambda t: (torch.zeros(*shape),), from_hf)


def swiglu_mlp(ours_prefix: str, hf_prefix: str, ffn: int) -> List[Rule]:
    """A gated MLP: our fused ``linear_fc1 = [gate; up]`` and ``linear_fc2``; HF gate / up / down."""
    return [
        concat(
            f"{ours_prefix}linear_fc1.weight",
            (f"{hf_prefix}gate_proj.weight", f"{hf_prefix}up_proj.weight"),
            (ffn, ffn),
        ),
        same(f"{ours_prefix}linear_fc2.weight", f"{hf_prefix}down_proj.weight"),
    ]
