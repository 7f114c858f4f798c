"""Context parallelism (CP): which positions a rank holds, and how keys / values move between ranks.

Layout: Megatron's load-balanced assignment (``megatron.core.utils.get_batch_on_this_cp_rank``). A
sequence of ``T`` positions is cut into ``2 * CP`` chunks of ``L = T / (2 * CP)``; CP rank ``r``
holds chunks ``r`` and ``2 * CP - 1 - r``, in that order, as its local sequence of ``2L``
positions. Under a causal mask the early chunk is cheap and the late one dear, so every rank does
the same work. Megatron's RoPE slices its frequencies the same way (``get_pos_emb_on_this_cp_rank``).

What a query of chunk ``c`` needs:

* full attention: every key before it, ``[0, (c + 1) L)``. :meth:`ContextParallel.gather_sequence`
  all-gathers K and V over the CP group (Megatron's ``all_gather`` CP scheme; the backward is a
  reduce-scatter, which sums every rank's gradient of each key). Each rank receives
  ``(CP - 1) * 2L`` positions per tensor.
* a sliding window of ``W`` keys: its own chunk and a *halo*, the ``min(W - 1, cL)`` positions just
  before the chunk, which live on other ranks' chunks (several chunks when ``W - 1 > L``).
  :meth:`ContextParallel.fetch_halo` fetches exactly those with one all-to-all (the backward is the
  reverse all-to-all, summed into the keys' gradients): at most ``2 (W - 1)`` positions per rank,
  against ``(CP - 1) * 2L`` for full attention, a ratio of about ``W / (T / CP)``.

Traffic is counted in :attr:`ContextParallel.received_bytes` (bytes a rank receives from the other
ranks, forward and backward separately), for the communication benchmark.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["ContextParallel", "context_parallel_of"]

# torch 2.13 renamed the tensor forms of the collectives (the old names warn); older torch has the old ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ContextParallel:
    """One rank's view of its CP group: the chunks it holds and the key / value exchanges."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.received_bytes: Counter = Counter()
        """``"<kind>/forward"`` and ``"<kind>/backward"`` -> bytes received from the other ranks; kinds:
        ``full`` (the all-gather), ``window`` (the halo exchange), ``entropy`` (the last query and the
        entropy statistics)."""

    @property
    def chunks(self) -> Tuple[int, int]:
        """The global chunk indices this rank holds, in local order."""
        return self.rank, 2 * self.size - 1 - self.rank

    def chunk_length(self, local_length: int) -> int:
        if local_length % 2:
            raise ValueError(f"a context-parallel rank holds two chunks of equal length; got {local_length} positions")
        return local_length // 2

    def positions(self, local_length: int, device=None) -> torch.Tensor:
        """Global positions ``[2L]`` of this rank's local sequence of ``local_length = 2L`` positions."""
        chunk = self.chunk_length(local_length)
        return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in self.chunks])

    # -- full attention: all-gather ---------------------------------------------------------------

    def gather_sequence(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence of ``x`` (this rank's ``2L`` positions along ``dim``) in global order:
        ``T = 2 * CP * L`` positions along ``dim``. Differentiable: the backward sums every rank's
        gradient of each position and returns this rank's share."""
        gathered = _GatherSequence.apply(x.movedim(dim, 0), self)  # [CP * 2L, ...], rank order
        order = _global_order(self.size, self.chunk_length(x.shape[dim])).to(x.device)
        return gathered.index_select(0, order).movedim(0, dim)

    # -- sliding window: halo exchange ------------------------------------------------------------

    def fetch_halo(self, x: torch.Tensor, dim: int, window: int) -> List[torch.Tensor]:
        """For each local chunk ``c`` (see :attr:`chunks`), the ``min(window - 1, cL)`` positions of ``x``
        just before it, in order (empty for chunk 0 or ``window == 1``), gathered from whichever ranks
        hold them by one all-to-all. Differentiable (the backward is the reverse all-to-all)."""
        chunk = self.chunk_length(x.shape[dim])
        plan = _halo_plan(self.size, self.rank, chunk, window)
        rows = x.movedim(dim, 0)  # [2L, ...]
        received = _Exchange.apply(rows, plan, self)  # [sum of halos, ...], in halo order
        halos = received.split(list(plan.halo_lengths), dim=0)
        return [h.movedim(0, dim) for h in halos]

    # -- small statistics, for attention entropy ---------------------------------------------------

    @torch.no_grad()
    def gather_stats(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (the same shape on each), stacked: ``[CP, *x.shape]``. No gradient."""
        flat = x.reshape(-1).contiguous()
        out = flat.new_empty(self.size * flat.numel())
        _all_gather(out, flat, group=self.group)
        self.received_bytes["entropy/forward"] += (self.size - 1) * x.numel() * x.element_size()
        return out.view(self.size, *x.shape)

    @torch.no_grad()
    def last_position(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` at the sequence's last position (``dim`` removed), the same on every CP rank: it is the
        last local position of CP rank 0, whose second chunk is the last one, broadcast from there."""
        row = x.select(dim, -1).clone(memory_format=torch.contiguous_format)  # a copy: the broadcast writes into it
        dist.broadcast(row, src=dist.get_global_rank(self.group, 0), group=self.group)
        if self.rank != 0:
            self.received_bytes["entropy/forward"] += row.numel() * row.element_size()
        return row


@functools.lru_cache(maxsize=64)
def _global_order(size: int, chunk: int) -> torch.Tensor:
    """Index into the rank-ordered gather (each rank contributes its two chunks of ``chunk``
    positions) of every position in global order."""
    index = []
    for c in range(2 * size):
        owner, slot = _owner(size, c)
        start = owner * 2 * chunk + slot * chunk
        index.extend(range(start, start + chunk))
    return torch.tensor(index, dtype=torch.long)


def _owner(size: int, chunk: int) -> Tuple[int, int]:
    """(CP rank, local slot 0 / 1) of a global chunk."""
    return (chunk, 0) if chunk < size else (2 * size - 1 - chunk, 1)


class _HaloPlan:
    """Who sends which local positions to whom, for every rank's halos (derived on every rank alike)."""

    def __init__(self, size: int, rank: int, chunk: int, window: int):
        def halo(c: int) -> range:  # global positions before chunk c that its window reaches
            start = c * chunk
            return range(max(0, start - (window - 1)), start)

        def needed(r: int) -> List[int]:  # rank r's halo positions, its chunks in local order
            return [p for c in (r, 2 * size - 1 - r) for p in halo(c)]

        def local_index(p: int) -> Tuple[int, int]:  # (owner rank, its local position) of position p
            owner, slot = _owner(size, p // chunk)
            return owner, slot * chunk + p % chunk

        mine = needed(rank)
        self.halo_lengths = tuple(len(halo(c)) for c in (rank, 2 * size - 1 - rank))
        # What this rank sends: to each rank d, its positions among d's needs, in d's order.
        send = [[local_index(p)[1] for p in needed(d) if local_index(p)[0] == rank] for d in range(size)]
        self.send_splits = [len(s) for s in send]
        self.send_index = torch.tensor([i for s in send for i in s], dtype=torch.long)
        # What it receives: from each rank s, its needs owned by s, in order; back to need order.
        owners = [local_index(p)[0] for p in mine]
        self.recv_splits = [owners.count(s) for s in range(size)]
        arrival = sorted(range(len(mine)), key=lambda i: (owners[i], i))  # need index of each received row
        order = torch.empty(len(mine), dtype=torch.long)
        order[torch.tensor(arrival, dtype=torch.long)] = torch.arange(len(mine))
        self.need_order = order
        """Row of the received buffer that holds each needed position, in need order."""
        self.remote_rows = len(mine) - self.recv_splits[rank]
        self.remote_sent_rows = sum(self.send_splits) - self.send_splits[rank]


@functools.lru_cache(maxsize=64)
def _halo_plan(size: int, rank: int, chunk: int, window: int) -> _HaloPlan:
    return _HaloPlan(size, rank, chunk, window)


def _row_bytes(x: torch.Tensor) -> int:
    return x[0].numel() * x.element_size() if x.shape[0] else 0


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over the CP group; backward: reduce-scatter (sum of every rank's gradient)."""

    @staticmethod
    def forward(ctx, rows, cp: ContextParallel):
        rows = rows.contiguous()
        out = rows.new_empty((cp.size * rows.shape[0], *rows.shape[1:]))
        _all_gather(out, rows, group=cp.group)
        cp.received_bytes["full/forward"] += (cp.size - 1) * rows.numel() * rows.element_size()
        ctx.cp = cp
        return out

    @staticmethod
    def backward(ctx, grad):
        cp = ctx.cp
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // cp.size, *grad.shape[1:]))
        _reduce_scatter(out, grad, group=cp.group)
        cp.received_bytes["full/backward"] += (cp.size - 1) * out.numel() * out.element_size()
        return out, None


class _Exchange(torch.autograd.Function):
    """The halo all-to-all: rows of this rank's ``[2L, ...]`` to the ranks that need them, and back
    (in the backward, the received rows' gradients return to their owners and are summed there)."""

    @staticmethod
    def forward(ctx, rows, plan: _HaloPlan, cp: ContextParallel):
        send = rows.index_select(0, plan.send_index.to(rows.device)).contiguous()
        received = rows.new_empty((sum(plan.recv_splits), *rows.shape[1:]))
        dist.all_to_all_single(received, send, plan.recv_splits, plan.send_splits, group=cp.group)
        cp.received_bytes["window/forward"] += plan.remote_rows * _row_bytes(rows)
        ctx.plan, ctx.cp, ctx.length = plan, cp, rows.shape[0]
        return received.index_select(0, plan.need_order.to(rows.device))

    @staticmethod
    def backward(ctx, grad):
        plan, cp = ctx.plan, ctx.cp
        arrived = torch.empty_like(grad).index_copy_(0, plan.need_order.to(grad.device), grad)  # arrival order
        back = grad.new_empty((sum(plan.send_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, arrived.contiguous(), plan.send_splits, plan.recv_splits, group=cp.group)
        cp.received_bytes["window/backward"] += plan.remote_sent_rows * _row_bytes(back)
        grad_rows = grad.new_zeros((ctx.length, *grad.shape[1:]))
        grad_rows.index_add_(0, plan.send_index.to(grad.device), back)
        return grad_rows, None, None


def context_parallel_of(pg_collection) -> Optional[ContextParallel]:
    """A :class:`ContextParallel` for the CP group of ``pg_collection``; None without CP (size 1)."""
    group = getattr(pg_collection, "cp", None)
    if group is None or dist.get_world_size(group) == 1:
        return None
    return ContextParallel(group)
