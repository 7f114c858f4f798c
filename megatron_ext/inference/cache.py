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
        self.next_position: Optional[int] = 0
        """While every write continued the last one from position 0 on (the decoder's order): the
        position the next write starts at, so that a query there sees every written slot (None
        after any other write: queries are masked by the slots' positions)."""

    def slot(self, positions: Tensor) -> Tensor:
        if self.window is None:
            return positions
        return torch.where(positions < self.sink, positions, self.sink + (positions - self.sink) % self.window)

    def write(self, key: Tensor, value: Tensor, positions: Tensor) -> None:
        """key / value ``[s, b, len(heads), hn]`` of ``positions`` (ascending)."""
        if positions.numel() == 1:  # a decode step: one slot, found without tensor arithmetic
            self._write_one(key, value, int(positions[0]))
            return
        first, count = int(positions[0]), positions.numel()
        consecutive = int(positions[-1]) - first == count - 1
        self.next_position = first + count if consecutive and first == self.next_position else None
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

    def _write_one(self, key: Tensor, value: Tensor, position: int) -> None:
        if self.window is None or position < self.sink:
            slot = position
        else:
            slot = self.sink + (position - self.sink) % self.window
        if slot >= self.positions.numel():
            raise ValueError(
                f"the KV cache holds {self.positions.numel()} positions; position {position} does not "
                "fit (raise the capacity)"
            )
        self.key[:, :, slot] = key[0]
        self.value[:, :, slot] = value[0]
        self.positions[slot] = position
        self.next_position = position + 1 if position == self.next_position else None

    def attend(self, query: Tensor, position: int, scale: float) -> Tensor:
        """query ``[b, len(heads), qpg, hn]`` at ``position`` -> ``[b, len(heads), qpg, hn]``."""
        if position + 1 == self.next_position:
            # Positions 0..position were written in order: the first min(position + 1, slots) slots
            # hold exactly the keys this query sees (a ring holds its window's last keys and its
            # sink), every other slot is empty, and no mask is needed. The query heads of a group
            # are the rows of one attention without a causal mask.
            used = min(position + 1, self.positions.numel())
            key, value = self.key[:, :, :used], self.value[:, :, :used]
            return F.scaled_dot_product_attention(query, key, value, scale=scale)
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


def _heads_index(heads: List[int]):
    """An index of the head dimension selecting ``heads``: a slice (a view) where they are consecutive."""
    if heads == list(range(heads[0], heads[-1] + 1)):
        return slice(heads[0], heads[-1] + 1)
    return heads


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
        self._index = [_heads_index(group.heads) for group in self.groups]

    def write(self, key: Tensor, value: Tensor, positions: Tensor) -> None:
        """key / value ``[s, b, kv heads, hn]`` (after RoPE) of ``positions``."""
        for group, heads in zip(self.groups, self._index):
            group.write(key[:, :, heads], value[:, :, heads], positions)

    def attend(self, query: Tensor, position: int, scale: float) -> Tensor:
        """One query per sequence, ``[1, b, query heads, hn]`` at ``position`` (its own key already
        written) -> ``[1, b, query heads * hn]``."""
        b, hn, qpg = query.shape[1], query.shape[3], self.queries_per_group
        q = query[0].view(b, self.num_kv_heads, qpg, hn)  # query heads grouped by their KV head
        if len(self.groups) == 1 and self.complete:  # one plan for every head: no gather or scatter
            return self.groups[0].attend(q, position, scale).reshape(1, b, -1)
        out = torch.empty_like(q) if self.complete else torch.zeros_like(q)
        for group, heads in zip(self.groups, self._index):
            out[:, heads] = group.attend(q[:, heads], position, scale)
        return out.reshape(1, b, -1)

    def nbytes(self) -> int:
        return sum(group.nbytes() for group in self.groups)
