"""KV cache of one attention pass of one layer, sized by what each KV head attends to.

Each KV head has a plan ``(window, sink)`` (its core attention's
:meth:`~megatron_ext.models.protocols.KeyPlanAttention.kv_cache_plan`; plain attention modules:
every head full):

* full heads (window None) keep every position: a ``[b, heads, capacity, hn]`` buffer;
* sliding-window heads keep their ``sink`` first keys and a ring buffer of the last ``window``
  keys: ``[b, heads, sink + window, hn]``, where the key at position p sits in slot ``p`` (p < sink)
  or ``sink + (p - sink) % window``, overwriting the one ``window`` positions older, which no later
  query sees.

* heads whose plan is None are not cached at all, and their output is zero: a loop pass of an SGT
  layer computes only its kept query heads (the others' factor is 0), so it caches only their KV
  heads.

Keys are stored after RoPE, so a ring's slot order does not matter (attention is a sum over
keys); each slot records its position and the mask is built from positions. Heads with the same
plan form one group and one buffer.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Plan = Optional[Tuple[Optional[int], int]]
"""(window, sink) of one KV head: window None = full attention; the plan None = not cached."""


class _Group:
    """The KV heads of one plan: their buffers and slot positions."""

    def __init__(self, heads: List[int], plan: Plan, batch: int, capacity: int, head_dim: int, dtype, device):
        self.heads = heads
        self.window, self.sink = plan
        slots = capacity if self.window is None else min(capacity, self.sink + self.window)
        shape = (batch, len(heads), slots, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.full((slots,), -1, dtype=torch.long, device=device)

    def slot(self, positions: Tensor) -> Tensor:
        if self.window is None:
            return positions
        return torch.where(positions < self.sink, positions, self.sink + (positions - self.sink) % self.window)

    def write(self, key: Tensor, value: Tensor, positions: Tensor) -> None:
        """key / value ``[s, b, len(heads), hn]`` of ``positions`` (ascending)."""
        keep = torch.ones_like(positions, dtype=torch.bool)
        if self.window is not None:  # of a long write, only what the ring keeps (distinct slots)
            keep = (positions < self.sink) | (positions > positions[-1] - self.window)
        positions = positions[keep]
        slots = self.slot(positions)
        if slots.numel() and int(slots.max()) >= self.positions.numel():
            raise ValueError(
                f"the KV cache holds {self.positions.numel()} positions; position "
                f"{int(positions.max())} does not fit (raise the capacity)"
            )
        self.key[:, :, slots] = key[keep].permute(1, 2, 0, 3)
        self.value[:, :, slots] = value[keep].permute(1, 2, 0, 3)
        self.positions[slots] = positions

    def attend(self, query: Tensor, position: int, scale: float) -> Tensor:
        """query ``[b, len(heads), qpg, hn]`` at ``position`` -> ``[b, len(heads), qpg, hn]``."""
        used = position + 1 if self.window is None else self.positions.numel()  # full: slot = position
        pos, key, value = self.positions[:used], self.key[:, :, :used], self.value[:, :, :used]
        allowed = (pos >= 0) & (pos <= position)
        if self.window is not None:
            allowed &= (pos > position - self.window) | (pos < self.sink)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # [b, heads, qpg, slots]
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.matmul(F.softmax(scores.float(), dim=-1).to(query.dtype), value)

    def nbytes(self) -> int:
        return self.key.numel() * self.key.element_size() * 2


class AttentionCache:
    """The KV cache of one attention pass (see module doc); ``plans`` has one entry per KV head."""

    def __init__(
        self,
        plans: Sequence[Plan],
        *,
        batch: int,
        capacity: int,
        head_dim: int,
        queries_per_group: int,
        dtype=torch.float32,
        device="cpu",
    ):
        by_plan: Dict[Plan, List[int]] = {}
        for head, plan in enumerate(plans):
            if plan is not None:
                by_plan.setdefault(tuple(plan), []).append(head)
        self.groups = [_Group(heads, plan, batch, capacity, head_dim, dtype, device) for plan, heads in by_plan.items()]
        self.num_kv_heads = len(plans)
        self.queries_per_group = queries_per_group
        self.complete = all(plan is not None for plan in plans)
        """Every KV head cached; otherwise the uncached heads' outputs are zeros."""

    def write(self, key: Tensor, value: Tensor, positions: Tensor) -> None:
        """key / value ``[s, b, kv heads, hn]`` (after RoPE) of ``positions``."""
        for group in self.groups:
            group.write(key[:, :, group.heads], value[:, :, group.heads], positions)

    def attend(self, query: Tensor, position: int, scale: float) -> Tensor:
        """One query per sequence, ``[1, b, query heads, hn]`` at ``position`` (its own key already
        written) -> ``[1, b, query heads * hn]``."""
        b, hn, qpg = query.shape[1], query.shape[3], self.queries_per_group
        q = query[0].view(b, self.num_kv_heads, qpg, hn)  # query heads grouped by their KV head
        out = torch.empty_like(q) if self.complete else torch.zeros_like(q)
        for group in self.groups:
            out[:, group.heads] = group.attend(q[:, group.heads], position, scale)
        return out.reshape(1, b, -1)

    def nbytes(self) -> int:
        return sum(group.nbytes() for group in self.groups)
