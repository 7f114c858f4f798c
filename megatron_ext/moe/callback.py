"""ERNIE 5.0 MoE (arXiv 2602.04705) in the training loop: elastic sub-networks, expert-bias upkeep,
load statistics.

Per optimizer step, on every rank:

1. ``on_step_begin``: with elastic training on, the step's sub-network is drawn from
   ``(seed, step)`` and applied (:mod:`megatron_ext.moe.elastic`).
2. Forward/backward: the :class:`~megatron_ext.moe.stats.LoadTracker` hooks count each router's
   tokens per expert and modality; Megatron's ``finalize_model_grads`` all-reduces each router's
   ``local_tokens_per_expert`` over TP x CP x DP, moves ``expert_bias`` by
   ``rate * sign(mean load - load)`` and zeroes the counts.
3. ``on_step_end``: the counts are reduced into ``[num_layers, M + 1, N]`` on every rank; the
   full network is restored; metrics are returned; per-modality usage accumulates (checkpointed).

[choice] In a width-restricted step the bias update is taken over the active experts: Megatron's
update would see zero load on the excluded experts and raise their bias (and lower the active
ones' against a mean diluted by the zeros). The callback instead restores the bias from before the
step and applies ``rate * sign(mean active load - load)`` to the active experts only; excluded
experts keep their bias. The loads are the tracker's reduced counts, which equal the ones
Megatron reduced (same tokens, same grad-enabled forwards).

Metrics: ``moe/load_cv`` and ``moe/load_ne`` (the step's mean over MoE layers that ran, over the
active experts); routing statistics of the step (:func:`~megatron_ext.moe.stats.routing_statistics`):
``moe/ne/<layer>``, ``moe/ne/<modality>``, ``moe/iou/<a>_<b>``, ``moe/load_max_over_mean``;
``moe/dropped_fraction`` in capacity mode; ``moe/load_balancing_loss`` (or ``seq_...``) and
``moe/z_loss`` when those losses are on (values without their coefficients);
``moe/bias_abs_mean`` (mean |expert_bias| over MoE layers, when the bias is on),
and with elastic training ``elastic/depth``, ``elastic/num_experts``, ``elastic/topk``. At the end
rank 0 writes ``plots/moe_expert_usage.png``: experts x modalities usage of a few layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_ext.capability import Callback, TrainContext
from megatron_ext.compat.moe import reset_token_counts, take_aux_losses
from megatron_ext.data.vocab import MODALITIES
from megatron_ext.moe import elastic
from megatron_ext.moe.config import ElasticConfig, RoutingConfig
from megatron_ext.moe.elastic import ElasticSampler, SubNetwork
from megatron_ext.moe.router import ElasticRouter, elastic_routers
from megatron_ext.moe.stats import LoadTracker, layer_metrics, normalized_entropy, routing_statistics, top_experts_iou
from megatron_ext.parallel.state import comm_device
from megatron_ext.plotting import pyplot

__all__ = ["MoECallback", "plot_expert_usage"]


class MoECallback(Callback):
    """Drives the :class:`~megatron_ext.moe.router.ElasticRouter`s of a model.

    Args:
        elastic_config: the ``elastic`` section.
        routing: the ``routing`` section.
        num_layers: decoder layers of the whole model.
        num_experts: routed experts per MoE layer.
        top_k: the model's default experts per token.
        seed: the run's seed (sub-networks are drawn from it and the step).
        plot_layers: global layer indices for the usage heatmap; None: up to 4 MoE layers.
        capacity_factor: ``moe.capacity_factor`` (None: dropless); with it ``moe/dropped_fraction``
            reports the share of token-expert assignments the capacity dropped.
    """

    name = "moe"
    metric_prefixes = ("moe/", "elastic/")

    def __init__(
        self,
        elastic_config: ElasticConfig,
        routing: RoutingConfig,
        num_layers: int,
        num_experts: int,
        top_k: int,
        seed: int,
        plot_layers: Optional[Sequence[int]] = None,
        capacity_factor: Optional[float] = None,
        aux_losses: Sequence[str] = (),
    ):
        if routing.mode == "modality_isolated" and elastic_config.enabled and elastic_config.width_full_prob < 1.0:
            raise ValueError(
                "elastic width (elastic.width_full_prob < 1) with routing.mode='modality_isolated' "
                "could leave a modality's partition with fewer than top-k active experts: set "
                "elastic.width_full_prob: 1 for the modality-isolated baseline"
            )
        self.elastic_config = elastic_config
        self.routing = routing
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.plot_layers = None if plot_layers is None else list(plot_layers)
        self.sampler = (
            ElasticSampler(elastic_config, num_layers, num_experts, top_k, seed) if elastic_config.enabled else None
        )
        self.usage = torch.zeros(num_layers, len(MODALITIES), num_experts, dtype=torch.long)
        """Cumulative tokens per layer, modality and expert over the run (checkpointed)."""
        self.routers: List[ElasticRouter] = []
        self.tracker: Optional[LoadTracker] = None
        self.sub: Optional[SubNetwork] = None
        """The sub-network of the step in progress (None: the full network)."""
        self._bias_before: Dict[int, torch.Tensor] = {}
        self._pp_group: Optional[dist.ProcessGroup] = None
        self.capacity_factor = capacity_factor
        self.aux_losses = list(aux_losses)
        """Megatron's names of the router losses that are on (``load_balancing_loss``, ``z_loss``, ...)."""
        self._tp_dp_cp_group: Optional[dist.ProcessGroup] = None

    # -- wiring --------------------------------------------------------------------------------------
    def on_train_start(self, ctx: TrainContext) -> None:
        self.routers = elastic_routers(ctx.model)
        pp_group = ctx.pg_collection.pp
        # A pipeline stage of dense layers only (moe.first_k_dense under PP) has no router, but still
        # joins every reduction over the pipeline group (load counts, bias statistics).
        if not self.routers and dist.get_world_size(pp_group) == 1:
            raise RuntimeError(
                "the moe callback found no ElasticRouter in the model: build the MoE layers' "
                "router with megatron_ext.moe.router.with_router"
            )
        has_bias = [r.expert_bias is not None for r in self.routers]
        if has_bias and set(has_bias) != {self.routing.expert_bias}:
            raise RuntimeError(
                f"routing.expert_bias={self.routing.expert_bias} but the model's routers "
                f"{'have' if any(has_bias) else 'lack'} an expert bias: build the model with "
                "moe_router_enable_expert_bias equal to routing.expert_bias"
            )
        self.tracker = LoadTracker(
            self.routers, self.num_layers, self.num_experts, reduce_group=ctx.pg_collection.tp_dp_cp, pp_group=pp_group
        )
        self._pp_group = pp_group
        self._tp_dp_cp_group = ctx.pg_collection.tp_dp_cp

    # -- per step ------------------------------------------------------------------------------------
    def on_step_begin(self, ctx: TrainContext) -> None:
        for router in self.routers:
            # finalize_model_grads zeroes the counts after its bias update; a grad-enabled forward
            # outside a training step (a probe, a test) would leak into the next update.
            reset_token_counts(router)
        # The stage's routing and elastic settings (a multi-stage run may change them; without
        # stages they are the run's).
        routing = getattr(ctx.config, "routing", self.routing)
        if self.routing.expert_bias:
            rate = routing.bias_rate_at(ctx.step + 1)
            for router in self.routers:  # read by the bias update after this step's backward
                router.config.moe_router_bias_update_rate = rate
        if self.sampler is None:
            return
        self.sub = self.sampler.sample(ctx.step + 1, getattr(ctx.config, "elastic", None))
        elastic.apply(ctx.model, self.sub)
        if self.sub.experts is not None and self.routing.expert_bias:
            self._bias_before = {id(r): r.expert_bias.detach().clone() for r in self.routers}

    def adjust_cost(self, ctx: TrainContext, cost) -> None:
        """MoE layers: the router over every expert, the step's top-k routed experts and the shared
        expert per token; the layers an elastic step skipped cost nothing."""
        from megatron_ext.models.flops import mlp_flops_per_token

        moe, m = ctx.config.moe, ctx.config.model
        top_k = self.top_k if self.sub is None or self.sub.top_k is None else self.sub.top_k
        swiglu = m.activation == "swiglu"
        per_token = (
            2 * m.hidden_size * moe.num_experts
            + top_k * mlp_flops_per_token(m.hidden_size, moe.expert_ffn_hidden_size, swiglu)
            + (
                mlp_flops_per_token(m.hidden_size, moe.shared_expert_ffn_hidden_size, swiglu)
                if moe.shared_expert_ffn_hidden_size
                else 0
            )
        )
        for layer, is_moe in zip(cost.layers, moe.layer_pattern_for(m.num_layers)):
            if is_moe:
                layer.mlp = per_token
        if self.sub is not None:
            kept = set(self.sub.layers)
            for index, layer in enumerate(cost.layers):
                layer.skipped = layer.skipped or index not in kept

    def on_step_end(self, ctx: TrainContext, result) -> Dict[str, float]:
        counts = self.tracker.reduce()  # [L, M + 1, N], the same on every rank
        totals = counts.sum(1)  # [L, N]
        sub = self.sub
        if sub is not None:
            if self._bias_before:
                self._update_bias_over_active_experts(totals, sub.experts)
            elastic.reset(ctx.model)
            self.sub = None
        self.usage += counts[:, : len(MODALITIES)]
        metrics: Dict[str, float] = {
            f"moe/{k}": v for k, v in layer_metrics(totals, None if sub is None else sub.experts).items()
        }
        metrics.update(
            {f"moe/{k}": v for k, v in routing_statistics(counts, None if sub is None else sub.experts).items()}
        )
        metrics.update(self._aux_loss_metrics(ctx.num_microbatches))
        if self.routing.expert_bias:
            metrics["moe/bias_abs_mean"] = self._bias_abs_mean()
        if self.capacity_factor is not None:  # token dropping: the share of assignments capacity dropped
            requested = int(self.tracker.step_requested.sum())
            metrics["moe/dropped_fraction"] = 1.0 - int(totals.sum()) / requested if requested else 0.0
        if self.sampler is not None:
            metrics.update(
                {
                    "elastic/depth": len(sub.layers),
                    "elastic/num_experts": self.num_experts if sub.experts is None else len(sub.experts),
                    "elastic/topk": sub.top_k,
                }
            )
        return metrics

    def _update_bias_over_active_experts(self, totals: torch.Tensor, experts: Sequence[int]) -> None:
        active = torch.zeros(self.num_experts, dtype=torch.bool)
        active[list(experts)] = True
        for router in self.routers:
            load = totals[router.layer_index].double()
            before = self._bias_before[id(router)]
            step = torch.sign(load[active].mean() - load) * router.config.moe_router_bias_update_rate
            update = torch.where(active, step, torch.zeros_like(step)).to(before)
            router.expert_bias.copy_(before + update)
        self._bias_before = {}

    def _aux_loss_metrics(self, num_microbatches: int) -> Dict[str, float]:
        """``moe/<name>`` of every router loss that is on: its value without coefficient, mean over the
        MoE layers that ran, over micro-batches and over the ranks that saw different tokens."""
        values = take_aux_losses()  # read (and zeroed) on every rank, also with nothing to report
        if not self.aux_losses:
            return {}
        table = torch.zeros(len(self.aux_losses), self.num_layers, dtype=torch.float64, device=comm_device())
        for i, name in enumerate(self.aux_losses):
            if name in values:  # a router-less stage has none: zeros, it still joins the reductions
                table[i] = values[name][: self.num_layers].double().to(table.device)
        if self._pp_group is not None and dist.get_world_size(self._pp_group) > 1:
            dist.all_reduce(table, group=self._pp_group)
        group = self._tp_dp_cp_group
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(table, group=group)
            table /= dist.get_world_size(group)
        table = table.cpu() / num_microbatches
        out = {}
        for i, name in enumerate(self.aux_losses):
            ran = table[i] != 0
            if ran.any():
                out[f"moe/{name}"] = float(table[i][ran].mean())
        return out

    def _bias_abs_mean(self) -> float:
        """Mean |expert_bias| over all MoE layers of the model (every stage's layers)."""
        table = torch.zeros(self.num_layers, 2, dtype=torch.float64, device=comm_device())  # [sum |b|, count]
        for router in self.routers:
            table[router.layer_index, 0] += router.expert_bias.detach().abs().sum().double()
            table[router.layer_index, 1] += router.num_experts
        if self._pp_group is not None and dist.get_world_size(self._pp_group) > 1:
            dist.all_reduce(table, group=self._pp_group)
        total = table.sum(0)
        return float(total[0] / total[1].clamp(min=1))

    def on_train_end(self, ctx: TrainContext) -> None:
        self.tracker.remove()
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        layers = self.plot_layers
        if layers is None:
            used = [i for i in range(self.num_layers) if self.usage[i].sum() > 0]
            layers = [used[round(j * (len(used) - 1) / 3)] for j in range(4)] if len(used) > 4 else used
            layers = sorted(set(layers))
        if layers and self.usage[layers].sum() > 0:
            plots = Path(ctx.run_dir) / "plots"
            plots.mkdir(parents=True, exist_ok=True)
            plot_expert_usage(plots / "moe_expert_usage.png", self.usage, layers)

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        # The sampler has no state (the sub-network is a function of (seed, step)); the expert
        # bias is a persistent buffer of the model and lives in the model checkpoint.
        return {"usage": self.usage.clone()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if not state:  # a checkpoint written without this callback: count from zero
            return
        usage = torch.as_tensor(state["usage"], dtype=torch.long)
        if usage.shape != self.usage.shape:
            raise ValueError(
                f"checkpointed expert usage has shape {tuple(usage.shape)}, this model "
                f"{tuple(self.usage.shape)} (layers, modalities, experts): the MoE shape changed"
            )
        self.usage = usage.clone()


def plot_expert_usage(path: Path, usage: torch.Tensor, layers: Sequence[int]) -> None:
    """Heatmaps experts x modalities of ``usage [L, M, N]`` for ``layers``: each modality's share of
    its routed tokens per expert; the title gives NE per modality and the top-25% IoUs."""
    plt = pyplot()
    used = [m for m in range(usage.size(1)) if usage[layers, m].sum() > 0]
    fig, axes = plt.subplots(
        1, len(layers), figsize=(1.0 + 2.8 * len(layers) + 0.4 * len(used), 1.8 + 0.18 * usage.size(2)), squeeze=False
    )
    for ax, layer in zip(axes[0], layers):
        counts = usage[layer, used].double()  # [m, N]
        share = counts / counts.sum(-1, keepdim=True).clamp(min=1)
        image = ax.imshow(share.T.numpy(), cmap="viridis", aspect="auto", vmin=0.0)
        ax.set_xticks(range(len(used)))
        ax.set_xticklabels([MODALITIES[m] for m in used], rotation=45, fontsize=7)
        ax.set_xlabel("modality of the routed tokens", fontsize=7)
        ax.set_ylabel("expert")
        lines = [f"layer {layer}"]
        if counts.size(-1) > 1:
            ne = normalized_entropy(counts)
            lines.append("NE " + " ".join(f"{MODALITIES[m]}={float(v):.2f}" for m, v in zip(used, ne)))
        pairs = [(a, b) for i, a in enumerate(used) for b in used[i + 1 :]]
        if pairs:
            lines.append(
                "top-25% IoU\n"
                + " ".join(
                    f"{MODALITIES[a]}/{MODALITIES[b]}={top_experts_iou(usage[layer, a], usage[layer, b]):.2f}"
                    for a, b in pairs[:3]
                )
            )
        ax.set_title("\n".join(lines), fontsize=7)
        bar = fig.colorbar(image, ax=ax, fraction=0.08)
        bar.set_label("share of the modality's routed tokens", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
