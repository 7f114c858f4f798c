"""Augmented-Lagrangian control of the expected SWA fraction of the ConSA (arXiv 2606.18056) gates.

With rho_hat the expected fraction of SWA units (:meth:`HardConcreteGates.expected_swa_fraction`)
and rho_t the target at step t, training solves the saddle-point problem

    min_{theta, log_alpha} max_{lambda1, lambda2}
        L = L_LM + lambda1 * (rho_hat - rho_t) + lambda2 * (rho_hat - rho_t)^2

as in CoFi / LLM-Shearing (Xia et al. 2022, 2024) [code]: model weights and log_alpha descend on L, the
multipliers ascend on it. Ascent gives dL/dlambda1 = rho_hat - rho_t, so lambda1 keeps growing in the
direction that penalises the current violation, and dL/dlambda2 = (rho_hat - rho_t)^2 >= 0, so lambda2
only grows, stiffening the quadratic penalty while the constraint is violated. Both start at 0.

The target warms up linearly [code], rho_t = rho * min(1, t / warmup_steps), so that the gates close
gradually instead of all being pushed at once from the "all full attention" initialisation.

In ``"per_layer"`` mode (for KV-head units) every layer has its own rho_hat_l and its own pair
(lambda1_l, lambda2_l); the constraint term is the sum over layers.
"""

from __future__ import annotations

import torch

from megatron_ext.consa.config import HybridAttentionConfig


class LagrangianController(torch.nn.Module):
    """Holds lambda1 and lambda2 and produces the constraint term of the loss.

    Shapes: [] in ``"global"`` mode, [num_layers] in ``"per_layer"`` mode.

    Update rule (gradient ascent, kept apart from the model's optimizer): each training step adds
    ``constraint_loss(rho_hat, step)`` to the loss once, runs backward, lets the model optimizer
    step the weights and log_alpha, and calls :meth:`ascent_step`, which applies
    ``lambda += lambda_lr * grad`` and clears the gradients. [choice] The multipliers are deliberately not
    handed to the model optimizer with a flipped gradient: AdamW would decay them and rescale
    their steps per coordinate, the model's learning-rate schedule would drive them, and a sharded
    mixed-precision optimizer would cast and shard them. So keep this module out of the model
    optimizer's parameters and out of any DDP wrapper.

    The lambda gradients depend only on rho_hat, i.e. on log_alpha, which is replicated, so they
    are identical on every data-parallel rank and need no all-reduce. Add the term once per step
    (not once per micro-batch, or the ascent step is multiplied by the number of micro-batches),
    and unscale the gradients first if the loss is scaled.
    """

    def __init__(self, config: HybridAttentionConfig, num_layers: int):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers={num_layers!r} is not allowed: use an integer >= 1")
        self.target = config.target
        """Target fraction rho of units that use sliding-window attention."""
        self.mode = config.constraint
        """``"global"``: one fraction over all units and one (lambda1, lambda2) pair; ``"per_layer"``:
        each layer's units meet the target on their own, with one pair per layer."""
        self.warmup_steps = config.target_warmup_steps
        self.lambda_lr = config.lambda_lr
        """Step size of the gradient ascent on lambda1 and lambda2 (plain, not Adam)."""
        self.num_layers = num_layers
        shape = () if self.mode == "global" else (num_layers,)
        self.lambda1 = torch.nn.Parameter(torch.zeros(shape))
        self.lambda2 = torch.nn.Parameter(torch.zeros(shape))

    def target_at(self, step: int) -> float:
        """rho_t = rho * min(1, step / warmup_steps); rho itself when warmup_steps = 0."""
        if step < 0:
            raise ValueError(f"step={step!r} is not allowed: use an integer >= 0")
        if self.warmup_steps == 0:
            return self.target
        return self.target * min(1.0, step / self.warmup_steps)

    def constraint_loss(self, rho_hat: torch.Tensor, step: int) -> torch.Tensor:
        """Scalar sum of lambda1 * (rho_hat - rho_t) + lambda2 * (rho_hat - rho_t)^2.

        ``rho_hat`` is the expected SWA fraction in this controller's mode: shape [] for
        ``"global"``, [num_layers] for ``"per_layer"`` (the sum then runs over layers). The result
        is differentiable w.r.t. ``rho_hat`` (hence log_alpha) and the multipliers.
        """
        expected = tuple(self.lambda1.shape)
        if tuple(rho_hat.shape) != expected:
            raise ValueError(
                f"rho_hat has shape {tuple(rho_hat.shape)}, but mode={self.mode!r} "
                f"with num_layers={self.num_layers} needs {expected}"
            )
        gap = rho_hat - self.target_at(step)  # [] or [num_layers]
        return (self.lambda1 * gap + self.lambda2 * gap.square()).sum()

    @torch.no_grad()
    def ascent_step(self) -> None:
        """lambda += lambda_lr * dL/dlambda for both multipliers, then clear their gradients.

        Call once per training step after backward; a multiplier without a gradient is left as is.
        """
        for param in (self.lambda1, self.lambda2):
            if param.grad is not None:
                param.add_(param.grad, alpha=self.lambda_lr)
                param.grad = None

    def extra_repr(self) -> str:
        return (
            f"target={self.target}, mode={self.mode!r}, warmup_steps={self.warmup_steps}, "
            f"lambda_lr={self.lambda_lr}, num_layers={self.num_layers}"
        )
