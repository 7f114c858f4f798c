"""An Adam for the gate logits whose second moment is shared by all units (``gate_optimizer:
shared_scale_adam``).

Per-unit Adam divides each unit's gradient by that unit's own RMS gradient. For ConSA gates the
allocation signal is the *size* of a unit's LM gradient (how much the loss gains from its full
attention), and on natural text its noise grows with it (measured: per-step std 1.3 to 1.9 x the
mean for every unit), so each unit's normalized drift mean / RMS comes out nearly the same and units
with strong and weak signals move alike. Sharing one second moment, the mean over units of the
squared gradient, keeps the step scale-free (the learning rate is still in log_alpha units per step)
while keeping the units' relative gradient sizes, as plain SGD would. [choice]

    m_t = beta1 m_{t-1} + (1 - beta1) g_t                       per unit
    v_t = beta2 v_{t-1} + (1 - beta2) mean_units(g_t^2)          one scalar per parameter
    log_alpha -= lr * (m_t / (1 - beta1^t)) / (sqrt(v_t / (1 - beta2^t)) + eps)
"""

from __future__ import annotations

import torch


class SharedScaleAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.0, 0.99), eps: float = 1e-12):
        if not lr > 0:
            raise ValueError(f"lr={lr!r} is not allowed: use a number > 0")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "SharedScaleAdam takes no closure"
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros((), dtype=p.dtype)
                state["step"] += 1
                t = state["step"]
                grad = p.grad
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).add_(grad.square().mean(), alpha=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1**t)
                v_hat = state["exp_avg_sq"] / (1 - beta2**t)
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))
