"""Head informativeness for SGT: entropy of the last query's attention row, tracked as an EMA.

SGT (Sparse Growing Transformer, arXiv 2603.23998) scores an attention head by how
spread out the attention of the *last* query position is [code]. With logits
``s_j = scale * <q_last, k_j>`` over the ``T`` keys and ``p = softmax(s)``,

    H = -sum_j p_j ln p_j / ln T        (in [0, 1]; 1 means uniform attention)

Under a causal mask the last query sees every key, so no mask is needed and the row costs
``O(T d)`` per head instead of the ``O(T^2 d)`` of a full attention matrix. High entropy marks a
head (and, averaged over its heads, a layer) as informative: it is the one grown into a loop.

Per optimizer step the per-head entropies are averaged over the batch and the micro-batches,
averaged over the data-parallel ranks, and smoothed across steps by an exponential moving
average with decay 0.5 (the released configuration's ``ema_decay``) [code]:

    ema_t = decay * ema_{t-1} + (1 - decay) * h_t,      ema_1 = h_1.

Reference code: ``olmo/loop_attention.py`` (``compute_entropy_from_weights``,
``finalize_entropy``) and ``olmo/model.py`` (``_compute_last_attention_weights_for_entropy``) of
the authors' repository (YaoChen0203/Sparse-Growing-Transformer). Relation to it:

* [choice] The first observation initializes the EMA. The reference starts from zeros, which
  scales the EMA after t updates by (1 - decay^t): harmless when every layer is observed from
  step 1, but it would rank a layer first observed later below its true entropy.
* [choice] Observations are averaged over data-parallel ranks *before* the EMA update; the
  reference all-reduces the EMA afterwards. Both are the same number because the EMA is linear
  and every rank updates the same layers at the same steps; reducing the observations takes one
  collective per step for all layers together.
* What to observe [code]: every head's entropy from the layer's ordinary attention pass, except
  that once a layer loops, its kept heads are fed the entropy of their last loop pass instead
  (``finalize_entropy``; :func:`merge_loop_entropy`). Since a selected layer's score also decides
  top-k membership, it steers which layer is selected or deepened next.
* [choice] A head that attends to a sliding window (a sparse head of a hybrid layer) is scored on
  the row it really computes, its last ``W`` keys (and sinks), normalised by ln of their number
  (:func:`seen_keys_entropy`); the reference has full attention only. During mask learning (gated
  full + sliding attention) the full row is used.
* [choice] The entropy uses ``log_softmax`` rather than ``log(clamp(p, 1e-12))``: same value, without the
  clamp's bias for near-zero probabilities.
* Under document masking (``data.reset_attention_mask``) the last query attends within its own
  document only: ``first_key [b]`` (its document's start) limits the keys, the sinks are the document's
  first keys, and the normalisation is ln of the keys it sees in that sample.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "EntropyTracker",
    "last_query_entropy",
    "seen_keys_entropy",
    "seen_keys_entropy_context_parallel",
    "merge_loop_entropy",
]

KeyPlan = Tuple[Optional[int], int]
"""What one KV head's queries see: (window, sink); window None = every earlier key (full
attention), else the last ``window`` keys and the first ``sink`` (a hybrid layer's sparse heads)."""


@torch.no_grad()
def last_query_entropy(q_last: torch.Tensor, k: torch.Tensor, scale: float, num_kv_groups: int = 1) -> torch.Tensor:
    """Normalized entropy of the last query position's attention row, per (batch, head).

    Args:
        q_last: ``[b, h, d]`` query vectors of the last position, after RoPE (and QK-norm).
        k: ``[b, h_kv, T, d]`` the keys the last query attends to, after RoPE: all ``T`` of them,
            since the causal mask hides none from the last position.
        scale: softmax scale applied to the logits (``1/sqrt(d)`` unless the model sets another).
        num_kv_groups: query heads per KV head, ``h // h_kv`` (grouped-query attention); query
            head ``i`` uses KV head ``i // num_kv_groups``. 1 means multi-head attention.

    Returns:
        ``[b, h]`` tensor (float32; float64 for float64 inputs) with ``-sum_j p_j ln p_j / ln T``,
        where ``p = softmax(scale * q_last k^T)``; zeros when ``T == 1`` (a single key carries no
        choice, and ``ln 1 = 0`` would divide by zero).

    Only ``b * h * T`` logits are formed, in at least float32 (matmul, softmax and entropy).
    """
    if q_last.dim() != 3 or k.dim() != 4:
        raise ValueError(
            f"expected q_last [b, h, d] and k [b, h_kv, T, d], got {tuple(q_last.shape)} and {tuple(k.shape)}"
        )
    b, h, d = q_last.shape
    kb, h_kv, t, kd = k.shape
    if (kb, kd) != (b, d):
        raise ValueError(
            f"q_last {tuple(q_last.shape)} and k {tuple(k.shape)} disagree on the batch size or the head dimension"
        )
    if num_kv_groups < 1 or h != h_kv * num_kv_groups:
        raise ValueError(
            f"num_kv_groups={num_kv_groups} does not fit {h} query heads over {h_kv} KV "
            f"heads: it must be h // h_kv = {h / h_kv:g}"
        )
    if t == 1:
        out_dtype = torch.promote_types(q_last.dtype, torch.float32)
        return torch.zeros(b, h, dtype=out_dtype, device=q_last.device)
    # [b, h_kv, g, d] x [b, h_kv, T, d] -> [b, h_kv, g, T]: each KV head serves its group of
    # consecutive query heads without repeating k.
    # At least float32 for the logits too: a bf16 matmul's rounding moves the entropy by ~3e-3.
    dtype = torch.promote_types(q_last.dtype, torch.float32)
    q = q_last.reshape(b, h_kv, num_kv_groups, d).to(dtype)
    logits = torch.matmul(q, k.to(dtype).transpose(-1, -2)).mul_(scale)
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return entropy.reshape(b, h) / math.log(t)


@torch.no_grad()
def seen_keys_entropy(
    q_last: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    kv_of_query: Sequence[int],
    plans: Optional[Sequence[KeyPlan]] = None,
    first_key: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Like :func:`last_query_entropy`, for any query heads and over the keys each head really
    attends to: query head ``i`` (``q_last[:, i]``) uses KV head ``kv_of_query[i]`` of ``k``
    ``[b, h_kv, T, d]``, whose plan (``plans[kv]``, default full) gives its keys: all ``T``, or its
    ``sink`` first and ``window`` last ones. Normalised by ln of the number of keys seen (ln min(W, T)
    for a plain sliding window). ``first_key [b]``: the last query's document start per sample
    (document masking; see the module doc). Returns ``[b, len(kv_of_query)]``."""
    if first_key is not None:
        return _document_entropy(q_last, k, scale, kv_of_query, plans, first_key)
    b, nq, d = q_last.shape
    t = k.shape[2]
    plans = list(plans) if plans is not None else [(None, 0)] * k.shape[1]
    out = torch.empty(b, nq, dtype=torch.promote_types(q_last.dtype, torch.float32), device=q_last.device)
    by_plan: Dict[KeyPlan, List[int]] = {}
    for head, kv in enumerate(kv_of_query):
        by_plan.setdefault(tuple(plans[kv]), []).append(head)
    for (window, sink), heads in by_plan.items():
        keys = k.index_select(1, torch.tensor([kv_of_query[h] for h in heads], device=k.device))
        if window is not None and window < t:
            first = min(sink, t)
            keys = torch.cat([keys[:, :, :first], keys[:, :, max(first, t - window) :]], dim=2)
        out[:, heads] = last_query_entropy(q_last[:, heads], keys, scale, 1)
    return out


def _visible_to_last(
    positions: torch.Tensor, seq_length: int, plan: KeyPlan, first_key: Optional[torch.Tensor]
) -> torch.Tensor:
    """``[b or 1, len(positions)]``: which key positions the last query (at ``seq_length - 1``) sees
    under ``plan``, within its document from ``first_key [b]`` on (None: the sequence's start)."""
    window, sink = plan
    first = torch.zeros(1, 1, dtype=torch.long, device=positions.device) if first_key is None else first_key[:, None]
    keys = positions[None, :]
    visible = keys >= first
    if window is not None:
        visible = visible & ((keys >= seq_length - window) | (keys < first + sink))
    return visible


def _document_entropy(q_last, k, scale: float, kv_of_query, plans, first_key: torch.Tensor) -> torch.Tensor:
    """:func:`seen_keys_entropy` under document masking: masked logits, per-sample normalisation."""
    t = k.shape[2]
    plans = list(plans) if plans is not None else [(None, 0)] * k.shape[1]
    dtype = torch.promote_types(q_last.dtype, torch.float32)
    index = torch.tensor(list(kv_of_query), dtype=torch.long, device=k.device)
    keys = k.index_select(1, index).to(dtype)  # [b, nq, T, d]: each query head's KV head
    logits = torch.einsum("bhd,bhtd->bht", q_last.to(dtype), keys).mul_(scale)
    positions = torch.arange(t, device=k.device)
    visible = torch.stack(
        [_visible_to_last(positions, t, tuple(plans[kv]), first_key).expand(k.shape[0], t) for kv in kv_of_query], 1
    )  # [b, nq, T]
    log_p = torch.log_softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    entropy = -torch.where(visible, log_p.exp() * log_p, torch.zeros_like(log_p)).sum(-1)
    seen = visible.sum(-1).to(entropy.dtype)
    norm = torch.log(seen)
    return torch.where(seen > 1, entropy / norm.clamp(min=1e-30), torch.zeros_like(entropy))


@torch.no_grad()
def seen_keys_entropy_context_parallel(
    q_last: torch.Tensor,
    k_local: torch.Tensor,
    positions: torch.Tensor,
    seq_length: int,
    scale: float,
    kv_of_query: Sequence[int],
    plans: Optional[Sequence[KeyPlan]],
    cp,
    first_key: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`seen_keys_entropy` when the keys are spread over a context-parallel group ``cp``
    (:class:`~megatron_ext.parallel.context.ContextParallel`): ``q_last [b, nq, d]`` is the last
    query (the same on every rank), ``k_local [b, h_kv, S, d]`` this rank's keys at global
    ``positions [S]`` of a ``seq_length`` sequence. Each rank reduces its own keys to two numbers per
    (batch, head), the log-sum-exp ``l_r`` of its visible logits and their softmax mean ``e_r``; with
    ``l = logsumexp_r l_r`` the entropy is ``H = l - sum_r exp(l_r - l) e_r`` (from
    ``H = -sum_j p_j (s_j - l)``), so only ``2 b nq`` numbers per rank are exchanged, not the keys.
    ``first_key [b]``: as for :func:`seen_keys_entropy`. Returns ``[b, nq]``, equal on every rank."""
    b, nq, _ = q_last.shape
    dtype = torch.promote_types(q_last.dtype, torch.float32)
    plans = list(plans) if plans is not None else [(None, 0)] * k_local.shape[1]
    index = torch.tensor(list(kv_of_query), dtype=torch.long, device=k_local.device)
    keys = k_local.index_select(1, index).to(dtype)  # [b, nq, S, d]: each query head's KV head
    logits = torch.einsum("bhd,bhsd->bhs", q_last.to(dtype), keys).mul_(scale)  # [b, nq, S]
    if first_key is not None:
        everywhere = torch.arange(seq_length, device=logits.device)
        visible = torch.stack(
            [_visible_to_last(positions, seq_length, tuple(plans[kv]), first_key) for kv in kv_of_query], 1
        )
        seen = torch.stack(
            [_visible_to_last(everywhere, seq_length, tuple(plans[kv]), first_key).sum(-1) for kv in kv_of_query], 1
        ).double()  # [b, nq]
    else:
        seen = torch.empty(nq, dtype=torch.float64)
        visible = torch.ones(nq, positions.numel(), dtype=torch.bool, device=logits.device)
        for head, kv in enumerate(kv_of_query):
            window, sink = plans[kv]
            if window is not None and window < seq_length:
                first = min(sink, seq_length)
                start = max(first, seq_length - window)
                visible[head] = (positions < first) | (positions >= start)
                seen[head] = first + seq_length - start
            else:
                seen[head] = seq_length
    logits.masked_fill_(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [b, nq], -inf where this rank sees none of a head's keys
    has_keys = torch.isfinite(lse)
    probs = torch.exp(logits - torch.where(has_keys, lse, 0.0).unsqueeze(-1))
    mean_logit = torch.where(has_keys, (probs * torch.nan_to_num(logits, neginf=0.0)).sum(-1), 0.0)
    stats = cp.gather_stats(torch.stack([lse, mean_logit]))  # [CP, 2, b, nq]
    total = torch.logsumexp(stats[:, 0], dim=0)  # [b, nq]
    weights = torch.exp(stats[:, 0] - total)  # 0 for ranks without keys
    entropy = total - (weights * stats[:, 1]).sum(0)
    norm = torch.log(seen).to(device=entropy.device, dtype=entropy.dtype)
    return torch.where(norm > 0, entropy / norm.clamp(min=1e-30), torch.zeros_like(entropy))


def merge_loop_entropy(
    first_pass: torch.Tensor, last_loop: Optional[torch.Tensor], kept: Sequence[int]
) -> torch.Tensor:
    """A looped layer's observation [code]: its kept heads (indices into the vectors) take the
    entropy of their last loop pass, its other heads that of the ordinary pass."""
    if last_loop is None or not kept:
        return first_pass
    merged = first_pass.clone()
    index = torch.tensor(list(kept), dtype=torch.long, device=merged.device)
    merged[index] = last_loop.to(merged.dtype)[index]
    return merged


class EntropyTracker:
    """Per-layer, per-head EMA of the last-query attention entropy.

    Usage per optimizer step: ``accumulate(layer, entropy)`` once per micro-batch and layer (the
    entropy already averaged over the micro-batch's sequences, shape ``[num_heads]``), then
    ``end_step(dp_group)`` once. ``end_step`` takes, for each layer observed in the step, the mean
    over its micro-batches, averages it over the data-parallel group, and folds it into the EMA
    (see the module docstring). Layers not observed in a step keep their EMA.

    Layers are global layer indices. The tracker does not gather across tensor- or
    pipeline-parallel ranks: the caller hands it whichever layers it wants tracked (possibly all
    layers on every rank). Every rank of ``dp_group`` must observe the same layers in a step,
    since their observations are reduced as one vector in sorted layer order.

    The EMA is kept on the CPU in float64: the scheduler reads it as Python numbers,
    and the per-step device-to-host copy is one vector of ``layers * heads`` values.
    """

    def __init__(self, layers: Iterable[int], num_heads: int, decay: float = 0.5):
        """
        Args:
            layers: global indices of the layers to track.
            num_heads: attention heads per layer (the length of every observation).
            decay: EMA decay in ``[0, 1)``; 0 keeps only the latest step.
        """
        self.layers: List[int] = sorted({int(layer) for layer in layers})
        self._tracked = frozenset(self.layers)
        if not self.layers:
            raise ValueError("layers is empty: pass the global indices of the layers to track")
        if num_heads < 1:
            raise ValueError(f"num_heads={num_heads} must be a positive int")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        self.num_heads = num_heads
        self.decay = float(decay)
        self._ema: Dict[int, torch.Tensor] = {}
        self._sum: Dict[int, torch.Tensor] = {}
        self._count: Dict[int, int] = {}

    def accumulate(self, layer: int, entropy_per_head: torch.Tensor) -> None:
        """Add one micro-batch's ``[num_heads]`` entropy of ``layer`` to the current step."""
        if layer not in self._tracked:
            raise KeyError(f"layer {layer} is not tracked (tracked layers: {self.layers})")
        if tuple(entropy_per_head.shape) != (self.num_heads,):
            raise ValueError(
                f"layer {layer}: expected entropy of shape ({self.num_heads},), got {tuple(entropy_per_head.shape)}"
            )
        value = entropy_per_head.detach().float()
        if layer in self._sum:
            self._sum[layer] += value
            self._count[layer] += 1
        else:
            self._sum[layer] = value.clone()
            self._count[layer] = 1

    def end_step(self, dp_group: Optional[dist.ProcessGroup] = None) -> None:
        """Average the step's micro-batches, then the data-parallel ranks, and update the EMA.

        Without ``dp_group``, or when ``torch.distributed`` is not initialized, no reduction is
        made. A step with no observation leaves the EMA as it was (and makes no collective call:
        every rank of the group must then have observed nothing).
        """
        observed = sorted(self._sum)
        if not observed:
            return
        means = torch.stack([self._sum[layer] / self._count[layer] for layer in observed])
        if dp_group is not None and dist.is_available() and dist.is_initialized():
            # SUM then divide: ReduceOp.AVG is NCCL-only, and gloo is used on CPU.
            dist.all_reduce(means, op=dist.ReduceOp.SUM, group=dp_group)
            means /= dist.get_world_size(group=dp_group)
        means = means.to(device="cpu", dtype=torch.float64)
        for layer, new in zip(observed, means):
            old = self._ema.get(layer)
            self._ema[layer] = new.clone() if old is None else self.decay * old + (1.0 - self.decay) * new
        self._sum.clear()
        self._count.clear()

    def layer_scores(self) -> Dict[int, float]:
        """``{layer: mean over heads of the EMA entropy}`` for every layer observed so far."""
        return {layer: float(ema.mean()) for layer, ema in sorted(self._ema.items())}

    def head_ema(self, layer: int) -> torch.Tensor:
        """``[num_heads]`` float64 EMA entropy of ``layer`` (a copy)."""
        if layer not in self._ema:
            state = "is not tracked" if layer not in self._tracked else "has no observation yet"
            raise KeyError(f"layer {layer} {state}")
        return self._ema[layer].clone()

    def head_emas(self) -> Dict[int, torch.Tensor]:
        """``{layer: head_ema(layer)}`` for every layer observed so far."""
        return {layer: ema.clone() for layer, ema in sorted(self._ema.items())}

    def state_dict(self) -> dict:
        """The EMA state; call between steps (after ``end_step``), when no observation is pending."""
        if self._sum:
            raise RuntimeError(
                f"layers {sorted(self._sum)} have observations not yet folded in: call end_step() before state_dict()"
            )
        return {
            "layers": list(self.layers),
            "num_heads": self.num_heads,
            "ema": {layer: ema.clone() for layer, ema in self._ema.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the tracked layers and head count must match."""
        if list(state["layers"]) != self.layers or state["num_heads"] != self.num_heads:
            raise ValueError(
                f"checkpoint tracks layers {list(state['layers'])} with {state['num_heads']} "
                f"heads; this tracker has layers {self.layers} with {self.num_heads} heads"
            )
        self._ema = {
            int(layer): ema.to(device="cpu", dtype=torch.float64).clone() for layer, ema in state["ema"].items()
        }
        self._sum.clear()
        self._count.clear()
