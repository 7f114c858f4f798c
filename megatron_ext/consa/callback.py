"""ConSA (arXiv 2606.18056) in the training loop: gates, constraint, binarization, static hybrid,
metrics and plots.

[choice] Gate logits ``log_alpha`` [num_layers, units] are tiny and replicated on every rank,
outside the model (not in DDP, not in the model optimizer): they have their own Adam, as in
LLM-Shearing [code], and the Lagrange multipliers their own ascent. Each layer's
:class:`HybridCoreAttention` reads its row.

Gradient of log_alpha after a step's backward, on every rank:
    LM part:   each rank holds the contributions of its layers (PP) and heads (TP) for its data;
               summed over the model-parallel group (TP x PP), averaged over data-parallel ranks.
    constraint: L_c = sum lambda1 (rho_hat - rho_t) + lambda2 (rho_hat - rho_t)^2 with rho_hat from
               the replicated gates, so every rank computes the same rho_hat, the same L_c and the
               same gradient; it is added once, after the reduction.
Every rank then applies the same update, and the gates stay identical everywhere. The gate noise
of step s and layer l is seeded by ``(train.seed, s, l)`` (:meth:`HardConcreteGates.noise`), so every
rank of a forward samples the same z.

Stages of a learned method, by global step s (1-based): ``s <= start`` (``mask_learning_start_step``)
dense warm-up, every layer full attention, gates untouched; ``start < s <= start + stage_steps`` mask
learning (gated attention; the target warm-up counts from ``start``); then the static hybrid.
``consa/stage`` reports 0 / 1 / 2. At binarization the allocation's diagnostics (decided units, the
constraint's gap) go to the log and to allocation.json, with a WARNING when the gates had not
polarized or the constraint had not settled: a tie broken by rank is not a learned allocation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_ext.capability import Callback, TrainContext
from megatron_ext.consa.allocation import (
    read_allocation,
    rule_head_allocation,
    rule_layer_allocation,
    rule_layer_pattern,
    swa_fraction,
    write_allocation,
)
from megatron_ext.consa.attention import HybridCoreAttention
from megatron_ext.consa.config import LEARNED_METHODS, HybridAttentionConfig
from megatron_ext.consa.constraint import LagrangianController
from megatron_ext.consa.diagnostics import GradientStats
from megatron_ext.consa.gates import HardConcreteGates, ScalarGates
from megatron_ext.parallel.state import comm_device


class LayerGate:
    """``gate(training)`` -> layer ``layer``'s z (a view of the shared gates; not an nn.Module,
    so the gates do not become parameters of the model). ``step()`` is the step in progress, whose
    noise a training forward uses."""

    def __init__(self, gates: HardConcreteGates, layer: int, step: Callable[[], int]):
        self.gates = gates
        self.layer = layer
        self.step = step

    def __call__(self, training: bool) -> torch.Tensor:
        if training:
            return self.gates.sample(step=self.step(), layer=self.layer)
        return self.gates.deterministic()[self.layer]


class ConSACallback(Callback):
    name = "hybrid_attention"
    state_aliases = ("consa",)
    metric_prefixes = ("consa/",)

    def __init__(
        self,
        cfg: HybridAttentionConfig,
        num_layers: int,
        num_kv_heads: int,
        consumed_tokens: Callable[[int], int],
        seed: int,
        log=print,
    ):
        self.cfg = cfg
        self.num_layers = num_layers
        self.units = 1 if cfg.granularity == "layer" else num_kv_heads
        self.num_kv_heads = num_kv_heads
        self.log = log
        self.learned = cfg.method in LEARNED_METHODS
        self.stage_steps = cfg.mask_learning_length(consumed_tokens) if self.learned else 0
        self.start_step = cfg.mask_learning_start_step if self.learned else 0
        """Mask learning runs in steps ``start_step + 1 .. start_step + stage_steps``."""
        self.current_step = 0  # the step in progress (its gate noise)
        self.diagnosed: Optional[Dict[str, object]] = None  # of the learned allocation, at binarization
        self.gates: Optional[HardConcreteGates] = None
        self.controller: Optional[LagrangianController] = None
        self.gate_optimizer: Optional[torch.optim.Optimizer] = None
        self.allocation: Optional[torch.Tensor] = None  # [L, units] bool once static
        self.history: List = []  # (step, log_alpha) for the plot
        self.window_losses: Optional[Dict[str, object]] = None
        """Validation losses of the weights mask learning starts from, when they are trained: every
        unit on full attention (``full``), every unit on SWA (``swa``) and, with
        ``unit_window_cost``, each unit alone on SWA (``units``, [L][units])."""
        self.grad_stats: Optional[GradientStats] = None
        """Per-unit moments of the LM and constraint parts of the gate gradient (learned methods)."""
        if self.learned:
            gate_cls = HardConcreteGates if cfg.method == "consa" else ScalarGates
            self.gates = gate_cls(
                num_layers,
                self.units,
                cfg.initial_hard_concrete() if cfg.method == "consa" else cfg.hard_concrete,
                generator=torch.Generator().manual_seed(seed),
                noise_seed=seed,
            )
            self.gate_optimizer = torch.optim.Adam(
                [self.gates.log_alpha], lr=cfg.gate_lr, betas=(cfg.gate_adam_beta1, 0.99)
            )
            self.grad_stats = GradientStats((num_layers, self.units))
            if cfg.method == "consa":
                self.controller = LagrangianController(cfg, num_layers)
        elif cfg.method == "rule_layer":
            pattern = cfg.layer_pattern or rule_layer_pattern(num_layers, cfg.target)
            self.allocation = rule_layer_allocation(num_layers, pattern)
        elif cfg.method == "rule_head":
            self.allocation = rule_head_allocation(num_layers, num_kv_heads, cfg.target)
        else:
            self.allocation = read_allocation(cfg.allocation, num_layers, num_kv_heads)

    # -- wiring ------------------------------------------------------------------------------------
    def on_train_start(self, ctx: TrainContext) -> None:
        self.pg_collection = ctx.pg_collection
        self.modules = [m for chunk in ctx.model for m in chunk.modules() if isinstance(m, HybridCoreAttention)]
        if not self.modules:
            raise RuntimeError("hybrid_attention is enabled but the model has no HybridCoreAttention layers")
        steps = ctx.config.train.steps if ctx.config is not None else None
        if self.learned and steps is not None and steps <= self.start_step and dist.get_rank() == 0:
            self.log(
                f"WARNING: consa: train.steps={steps} ends before mask learning starts "
                f"(hybrid_attention.mask_learning_start_step={self.start_step}): the run trains full attention only; "
                "raise train.steps or lower mask_learning_start_step"
            )
        seq_length = ctx.config.data.seq_length if ctx.config is not None else None
        if seq_length is not None and self.cfg.window >= seq_length and dist.get_rank() == 0:
            self.log(
                f"WARNING: consa: hybrid_attention.window={self.cfg.window} >= data.seq_length={seq_length}: "
                "sliding-window attention sees every key, so SWA units are full attention"
            )
        self._apply(ctx.step + 1)

    def stage(self, step: int) -> int:
        """0: dense warm-up, 1: mask learning, 2: static hybrid, for step ``step`` (1-based)."""
        if self.allocation is not None:
            return 2
        return 0 if step <= self.start_step else 1

    def _apply(self, step: int) -> None:
        """Every local layer's mode for step ``step``."""
        self.current_step = step
        stage = self.stage(step)
        for module in self.modules:
            if stage == 2:
                module.set_static(self.allocation[module.layer_index].tolist())
            elif stage == 1:
                module.set_gated(LayerGate(self.gates, module.layer_index, lambda: self.current_step))
            else:
                module.set_full()

    # -- per step ----------------------------------------------------------------------------------
    def adjust_cost(self, ctx: TrainContext, cost) -> None:
        """Keys per query of the step's kernels (as ``HybridCoreAttention.attention_pairs``): every unit
        full in the dense warm-up; full and the window kernel both during mask learning; per unit of
        the allocation once static."""
        from megatron_ext.models.kernels import window_kernel_pairs

        stage = self.stage(ctx.step)
        if stage == 0:
            return
        seq = cost.seq_length
        window_keys = seq if self.cfg.sink_tokens else window_kernel_pairs(seq, self.cfg.window) / seq
        for index, layer in enumerate(cost.layers):
            per_group = layer.query_heads // layer.kv_heads
            if stage == 1:
                layer.attention_keys = layer.query_heads * (seq + window_keys)
            else:
                units = self.allocation[index].tolist()
                full = [units[h * len(units) // layer.kv_heads] for h in range(layer.kv_heads)]
                layer.attention_keys = per_group * sum(seq if f else window_keys for f in full)

    def on_step_begin(self, ctx: TrainContext) -> None:
        if self.allocation is None:
            if self._starts_from_trained_weights(ctx):
                self._measure_window_cost(ctx)
            self._apply(ctx.step + 1)
            if self.cfg.method == "loza" and self.stage(ctx.step + 1) == 1:
                # LoZA learns its gates on a frozen model: this step updates no weight (the scheduler
                # sets the learning rate after every step; the next one's is zeroed here again).
                for group in ctx.optimizer.param_groups:
                    group["lr"] = 0.0

    def _starts_from_trained_weights(self, ctx: TrainContext) -> bool:
        """Whether step ``ctx.step + 1`` is the first of mask learning and the weights it starts from
        were trained: by a dense warm-up, or loaded by ``train.init_from``."""
        if not self.learned or self.window_losses is not None or ctx.evaluate is None or ctx.step != self.start_step:
            return False
        return self.start_step > 0 or (ctx.config is not None and ctx.config.train.init_from is not None)

    @torch.no_grad()
    def _measure_window_cost(self, ctx: TrainContext) -> None:
        """How much the trained weights use keys beyond the window: the validation loss with every unit
        on SWA minus the one with full attention (the same batches). Runs in on_step_begin, before
        the later capabilities' (registry order) per-step changes such as an elastic sub-network: both
        losses are the full network's, and the one with full attention is the periodic evaluation's."""
        for module in self.modules:
            module.set_full()
        full = ctx.evaluate()
        for module in self.modules:
            module.set_static([False] * self.units)
        swa = ctx.evaluate()
        self.window_losses = {"full": full, "swa": swa}
        if dist.get_rank() == 0:
            self.log(
                f"consa: mask learning starts at step {ctx.step + 1}: validation loss {full:.4f} with full "
                f"attention, {swa:.4f} with every unit on SWA (W={self.cfg.window}): window cost "
                f"{swa - full:+.4f}"
            )
        if self.cfg.unit_window_cost:
            self.window_losses["units"] = self._unit_losses(ctx)
            if dist.get_rank() == 0:
                costs = torch.tensor(self.window_losses["units"]) - full
                rows = "; ".join(f"L{i} " + " ".join(f"{c:+.4f}" for c in row) for i, row in enumerate(costs.tolist()))
                self.log(f"consa: window cost of each unit alone on SWA (per layer, by unit): {rows}")

    def _unit_losses(self, ctx: TrainContext) -> List[List[float]]:
        """Validation loss with unit (l, u) alone on SWA, every other unit full, [L][units]; every rank
        walks all units in the same order (the evaluation is collective), setting its own layers."""
        losses = []
        for layer in range(self.num_layers):
            row = []
            for unit in range(self.units):
                for module in self.modules:
                    if module.layer_index == layer:
                        module.set_static([u != unit for u in range(self.units)])
                    else:
                        module.set_full()
                row.append(ctx.evaluate())
            losses.append(row)
        return losses

    @property
    def unit_window_cost(self) -> Optional[torch.Tensor]:
        """[L, units] validation loss with each unit alone on SWA minus with full attention (None: not
        measured; ``hybrid_attention.unit_window_cost``)."""
        if self.window_losses is None or "units" not in self.window_losses:
            return None
        return torch.tensor(self.window_losses["units"]) - self.window_losses["full"]

    @property
    def window_cost(self) -> Optional[float]:
        """Validation loss with every unit on SWA minus with full attention, at the start of mask
        learning from trained weights (None: not measured)."""
        return None if self.window_losses is None else self.window_losses["swa"] - self.window_losses["full"]

    def on_step_end(self, ctx: TrainContext, result) -> Dict[str, object]:
        metrics = self._step_metrics(ctx, result)
        if self.window_losses is not None:  # every step from its measurement on, so logged records carry it
            metrics.update(
                {
                    "consa/val_loss_full_attention": self.window_losses["full"],
                    "consa/val_loss_all_swa": self.window_losses["swa"],
                    "consa/window_cost": self.window_cost,
                }
            )
        return metrics

    def _step_metrics(self, ctx: TrainContext, result) -> Dict[str, object]:
        stage = self.stage(ctx.step)
        if stage == 2:
            return {"consa/stage": 2, "consa/swa_fraction": swa_fraction(self.allocation)}
        if stage == 0:
            return {"consa/stage": 0}
        learning_step = ctx.step - self.start_step
        metrics = {"consa/stage": 1, **self._update_gates(learning_step, result.update_successful)}
        if self.cfg.method == "loza":
            metrics["consa/model_frozen"] = 1  # this step updated the gates only
        if learning_step % max(1, self.stage_steps // 50) == 0:
            self.history.append((ctx.step, self.gates.log_alpha.detach().clone()))
        if learning_step >= self.stage_steps:
            self._binarize(ctx)
        return metrics

    def _reduced_lm_grad(self) -> torch.Tensor:
        log_alpha = self.gates.log_alpha
        grad = log_alpha.grad if log_alpha.grad is not None else torch.zeros_like(log_alpha)
        grad = grad.to(comm_device())  # NCCL reduces CUDA tensors only; the gates stay on the CPU
        mp_group = self.pg_collection.mp  # TP x PP: each rank holds its layers' and heads' part
        if dist.get_world_size(mp_group) > 1:
            dist.all_reduce(grad, group=mp_group)
        dp_group = self.pg_collection.dp_cp
        if dist.get_world_size(dp_group) > 1:
            dist.all_reduce(grad, group=dp_group)
            grad /= dist.get_world_size(dp_group)
        return grad.to(log_alpha.device)

    def _update_gates(self, step: int, update_successful: bool) -> Dict[str, object]:
        lm_grad = self._reduced_lm_grad()
        self.last_lm_grad = lm_grad  # kept for inspection: the LM part of this step's gradient
        constraint_grad = torch.zeros_like(lm_grad)
        self.gate_optimizer.zero_grad(set_to_none=True)
        mode = self.cfg.constraint if self.controller is not None else "global"
        rho_hat = self.gates.expected_swa_fraction(mode)
        metrics: Dict[str, object] = {"consa/expected_swa_fraction": _value(rho_hat), **self._gate_metrics()}
        if self.controller is not None:
            constraint = self.controller.constraint_loss(rho_hat, step)
            c = self.controller
            g_alpha, g1, g2 = torch.autograd.grad(constraint, [self.gates.log_alpha, c.lambda1, c.lambda2])
            metrics.update(
                {
                    "consa/target": c.target_at(step),
                    "consa/constraint_loss": float(constraint.detach()),
                    "consa/lambda1": _value(c.lambda1),
                    "consa/lambda2": _value(c.lambda2),
                }
            )
            constraint_grad = g_alpha
            if update_successful:
                c.lambda1.grad, c.lambda2.grad = g1, g2
                c.ascent_step()
        grad = lm_grad + constraint_grad
        if update_successful and torch.isfinite(grad).all():
            self.grad_stats.update(lm_grad, constraint_grad)
            self.gates.log_alpha.grad = grad
            self.gate_optimizer.step()
            self.gate_optimizer.zero_grad(set_to_none=True)
            self.gates.clamp_()
        return metrics

    def _gate_metrics(self) -> Dict[str, object]:
        """Per-unit log_alpha and E[z] (flat, layer-major; one TensorBoard scalar per unit) and the
        share of decided units."""
        log_alpha = self.gates.log_alpha.detach()
        return {
            "consa/log_alpha": _value(log_alpha),
            "consa/expected_gate": _value(self.gates.expected_gate()),
            "consa/polarized_fraction": self.polarized_fraction(),
        }

    @torch.no_grad()
    def polarized_fraction(self, allocation: Optional[torch.Tensor] = None, side: Optional[bool] = None) -> float:
        """Share of decided units under ``allocation`` (default: the one binarizing now would give);
        over the FA units only (``side=True``), the SWA units only (False), or all.

        A unit is decided when its log_alpha clears, by at least ``polarization_threshold`` t, every
        unit that the allocation puts on the other side of its constraint group (a layer's units with
        ``per_layer``, all units otherwise): an FA unit lies >= t above the group's highest SWA unit, an
        SWA unit >= t below the group's lowest FA unit. In a group whose units all take one side, the
        sign decides, by t (FA >= +t, SWA <= -t).
        [choice] A margin, not the sign: with the constraint met, the FA gates settle where rho_hat
        equals the target, which can be below any fixed +t (at rho = 0.5 with the SWA gates at the
        lower clamp, P(z != 0) = 0.047, the FA gates sit at log_alpha 1.41), while gates that all lean
        one way, however far from 0, are ties broken by rank and not decisions.
        """
        if allocation is None:
            allocation = self.gates.binarize(self.cfg.target, self._binarize_mode(), self.cfg.binarize)
        log_alpha = self.gates.log_alpha.detach()
        rows = 1 if self._binarize_mode() == "global" else log_alpha.shape[0]
        groups, full = log_alpha.reshape(rows, -1), allocation.reshape(rows, -1)
        lowest_full = torch.where(full, groups, torch.inf).amin(dim=1, keepdim=True)
        highest_swa = torch.where(full, -torch.inf, groups).amax(dim=1, keepdim=True)
        lowest_full = torch.where(lowest_full.isinf(), 0.0, lowest_full)  # a group without FA units
        highest_swa = torch.where(highest_swa.isinf(), 0.0, highest_swa)  # ... or without SWA units
        margin = torch.where(full, groups - highest_swa, lowest_full - groups)
        decided = (margin >= self.cfg.polarization_threshold).reshape(allocation.shape)
        if side is not None:
            decided = decided[allocation == side]
        return float(decided.float().mean()) if decided.numel() else 1.0

    def _binarize_mode(self) -> str:
        return self.cfg.constraint if self.cfg.granularity == "kv_head" else "global"

    @torch.no_grad()
    def diagnostics(self, allocation: torch.Tensor) -> Dict[str, object]:
        """How trustworthy the learned ``allocation`` is: decided units, the constraint's gap, warnings.

        The gap is |rho_hat - rho_bound|, where rho_bound is the expected SWA fraction of
        ``allocation`` with every gate at its clamp bound (log_alpha_max for FA units, log_alpha_min
        for SWA units; per layer with ``per_layer``): the closest to the target that clamped gates
        can get (rho_hat cannot reach rho itself, since P(z != 0) > 0 at log_alpha_min). [choice]
        """
        cfg, hc = self.cfg, self.cfg.hard_concrete
        mode = cfg.constraint if self.controller is not None else "global"
        at_bounds = torch.where(allocation, hc.log_alpha_max, hc.log_alpha_min)
        rho_bound = self.gates.expected_swa_fraction(mode, log_alpha=at_bounds)
        gap = float((self.gates.expected_swa_fraction(mode).detach() - rho_bound).abs().max())
        polarized = self.polarized_fraction(allocation)
        sides = {
            "full attention": self.polarized_fraction(allocation, True),
            "SWA": self.polarized_fraction(allocation, False),
        }
        undecided = {side: share for side, share in sides.items() if share < cfg.min_polarized_fraction}
        cost = self.window_cost
        harmless = bool(undecided) and cost is not None and cost <= cfg.window_cost_tolerance
        if cost is None:
            advice = (
                "learn the mask longer (mask_learning_steps / _tokens) or from a trained start "
                "(mask_learning_start_step, train.init_from)"
            )
        else:
            advice = (
                f"learn the mask longer (mask_learning_steps / _tokens): at its start, every unit on SWA "
                f"cost {cost:+.4f} validation loss"
            )
        warnings = (
            []
            if harmless
            else [
                f"only {share:.0%} of the {side} units' gates are decided (log_alpha >= {cfg.polarization_threshold} "
                f"beyond the other side's units of their constraint group; hybrid_attention.min_polarized_fraction="
                f"{cfg.min_polarized_fraction}): the allocation is largely ties broken by rank; {advice}"
                for side, share in undecided.items()
            ]
        )
        if self.controller is not None and gap > cfg.constraint_tolerance:
            warnings.append(
                f"the constraint had not settled: |rho_hat - rho_bound| = {gap:.3f} > "
                f"hybrid_attention.constraint_tolerance={cfg.constraint_tolerance}; learn the "
                "mask longer or raise lambda_lr"
            )
        unit_cost = self.unit_window_cost
        return {
            "polarized_fraction": polarized,
            "polarized_full": sides["full attention"],
            "polarized_swa": sides["SWA"],
            "constraint_gap": gap,
            "window_cost": cost,
            "unit_window_cost": None if unit_cost is None else [[round(x, 6) for x in r] for r in unit_cost.tolist()],
            "harmless_ties": harmless,
            "gradients": self.grad_stats.summary(),
            "warnings": warnings,
        }

    def _binarize(self, ctx: TrainContext) -> None:
        self.allocation = self.gates.binarize(self.cfg.target, self._binarize_mode(), self.cfg.binarize)
        self.diagnosed = {**self.diagnostics(self.allocation), "binarize": self.cfg.binarize}
        self._apply(ctx.step + 1)
        if dist.get_rank() == 0:
            self._write_outputs(Path(ctx.run_dir))
            swa = int((~self.allocation).sum())
            ties = ""
            if self.diagnosed["harmless_ties"]:
                ties = (
                    f" (the undecided ones cannot matter: at the start of mask learning every unit on SWA cost "
                    f"{self.diagnosed['window_cost']:+.4f} validation loss, within hybrid_attention."
                    f"window_cost_tolerance={self.cfg.window_cost_tolerance})"
                )
            reached = (
                f" by the sign of log_alpha (SWA fraction {swa_fraction(self.allocation):.3f} against the target "
                f"{self.cfg.target})"
                if self.cfg.binarize == "sign"
                else ""
            )
            self.log(
                f"consa: binarized at step {ctx.step}: {swa} of {self.allocation.numel()} units use "
                f"sliding-window attention (W={self.cfg.window}){reached}; {self.diagnosed['polarized_fraction']:.0%} "
                f"of the gates decided{ties}, constraint gap {self.diagnosed['constraint_gap']:.3f}; training "
                "the static hybrid"
            )
            for warning in self.diagnosed["warnings"]:
                self.log(f"WARNING: consa: {warning}")

    def _write_outputs(self, run_dir: Path) -> None:
        from megatron_ext.consa.plots import plot_allocation, plot_gate_diagnostics, plot_log_alpha_history

        log_alpha = self.gates.log_alpha.detach() if self.gates is not None else None
        # A static allocation's target is its own fraction (the config's target does not apply to it).
        target = swa_fraction(self.allocation) if self.cfg.method == "static" else self.cfg.target
        write_allocation(
            run_dir / "allocation.json",
            self.allocation,
            granularity=self.cfg.granularity,
            window=self.cfg.window,
            target=target,
            method=self.cfg.method,
            log_alpha=log_alpha,
            diagnostics=self.diagnosed,
        )
        plots = run_dir / "plots"
        plots.mkdir(exist_ok=True)
        plot_allocation(
            plots / "consa_allocation.png",
            self.allocation,
            log_alpha,
            f"{self.cfg.method}: full attention (dark) / SWA, W={self.cfg.window}",
            tie_margin=self.cfg.polarization_threshold if self.learned else 0.0,
        )
        plot_log_alpha_history(plots / "consa_log_alpha.png", self.history)
        if self.diagnosed is not None:
            plot_gate_diagnostics(plots / "consa_gradients.png", self.diagnosed, log_alpha)

    def on_train_end(self, ctx: TrainContext) -> None:
        if self.allocation is not None and not self.learned and dist.get_rank() == 0:
            self._write_outputs(Path(ctx.run_dir))  # rule / static allocations are recorded too

    # -- checkpoint --------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        state: Dict[str, object] = {
            "allocation": self.allocation,
            "history": self.history,
            "window_losses": self.window_losses,
        }
        if self.gates is not None:
            state.update(
                gates=self.gates.state_dict(),
                gate_optimizer=self.gate_optimizer.state_dict(),
                grad_stats=self.grad_stats.state_dict(),
            )
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if not state:
            return
        self.allocation = state["allocation"]
        self.history = list(state["history"])
        self.window_losses = state.get("window_losses")  # absent in checkpoints written before it was measured
        if self.gates is not None:
            self.gates.load_state_dict(state["gates"])
            self.gate_optimizer.load_state_dict(state["gate_optimizer"])
            if "grad_stats" in state:  # absent in checkpoints written before it was kept
                self.grad_stats.load_state_dict(state["grad_stats"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])


def _value(t: torch.Tensor):
    t = t.detach()
    return float(t) if t.numel() == 1 else [round(float(x), 6) for x in t.flatten()]
