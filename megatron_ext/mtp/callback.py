"""The MTP weight of each step and the ``mtp/loss_<k>`` metrics."""

from __future__ import annotations

from typing import Dict, Optional

import torch.distributed as dist

from megatron_ext.capability import Callback, TrainContext


class MTPCallback(Callback):
    name = "mtp"
    metric_prefixes = ("mtp/",)

    def __init__(self, num_layers: int, weight: float, weight_final: Optional[float], steps: int):
        self.num_layers = num_layers
        self.weight = weight
        self.weight_final = weight_final
        self.steps = steps
        self._configs = []
        self._groups = None

    def weight_at(self, step: int) -> float:
        """Linear from ``weight`` at step 1 to ``weight_final`` at the last step."""
        if self.weight_final is None or self.steps <= 1:
            return self.weight
        t = min(1.0, max(0.0, (step - 1) / (self.steps - 1)))
        return self.weight + t * (self.weight_final - self.weight)

    def on_train_start(self, ctx: TrainContext) -> None:
        self._configs = list({id(c): c for c in (getattr(m, "module", m).config for m in ctx.model)}.values())
        self._groups = ctx.pg_collection

    def on_step_begin(self, ctx: TrainContext) -> None:
        for config in self._configs:  # read by GPTModel's MTP loss scaling in this step's forwards
            config.mtp_loss_scaling_factor = self.weight_at(ctx.step + 1)

    def adjust_cost(self, ctx: TrainContext, cost) -> None:
        """Each MTP depth: one decoder layer of the core spec (dense MLP, full attention), its
        projection and an output layer (:meth:`ModelCost.forward_flops_per_token`)."""
        from megatron_ext.models.flops import dense_layer_cost

        cost.mtp_layers = [
            dense_layer_cost(ctx.config.model, ctx.config.data.seq_length) for _ in range(self.num_layers)
        ]

    def on_step_end(self, ctx: TrainContext, result) -> Dict[str, float]:
        from megatron_ext.compat.moe import take_mtp_losses
        from megatron_ext.parallel.state import comm_device

        values = take_mtp_losses(self.num_layers).double().to(comm_device())  # this rank's sums per layer
        groups = self._groups
        if dist.get_world_size(groups.pp) > 1:  # only the last stage computed them
            dist.all_reduce(values, group=groups.pp)
        if dist.get_world_size(groups.dp_cp) > 1:
            dist.all_reduce(values, group=groups.dp_cp)
            values /= dist.get_world_size(groups.dp_cp)
        values = values.cpu() / ctx.num_microbatches
        metrics = {f"mtp/loss_{k + 1}": float(values[k]) for k in range(self.num_layers)}
        metrics["mtp/weight"] = self.weight_at(ctx.step)
        return metrics
