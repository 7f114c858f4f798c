"""What drives each ConSA gate during mask learning: the two parts of d(loss)/d(log_alpha) per unit.

The gradient of a gate logit has two parts (:mod:`megatron_ext.consa.callback`):

    LM part          dL_LM/dlog_alpha_u = E_batch[<dL/dout_u, FA_u - SWA_u>] * dz_u/dlog_alpha_u
    constraint part  d/dlog_alpha_u [lambda1 (rho_hat - rho_t) + lambda2 (rho_hat - rho_t)^2]

The LM part is the unit's own signal (how much the loss gains from its full attention); it is zero
in every step whose hard-concrete sample is clamped to exactly 0 or 1 (dz/dlog_alpha = 0 there), and
noisy in the others. The constraint part is common: units with equal log_alpha receive the same one.
A learned allocation needs the LM part to differ between units by more than its noise over the
steps of stage 1; :class:`GradientStats` measures exactly that, per unit:

    mean, std        of each part over the mask-learning steps (Welford's running moments)
    active_fraction  share of steps with a nonzero LM part (sample strictly inside (0, 1))
    separation       per unit, (mean_u - mean over units) / (std_u / sqrt(n)): how many standard
                     errors the unit's LM signal stands from the average unit's ([choice]: a t-like
                     score; |separation| >> 2 is a signal that n steps can resolve)
"""

from __future__ import annotations

from typing import Dict, List

import torch


class RunningMoments:
    """Mean and variance of a stream of equally shaped tensors (Welford, 1962), in float64."""

    def __init__(self, shape):
        self.count = 0
        self.mean = torch.zeros(shape, dtype=torch.float64)
        self.m2 = torch.zeros(shape, dtype=torch.float64)

    def update(self, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation (0 before two values)."""
        return (self.m2 / self.count).sqrt() if self.count > 1 else torch.zeros_like(self.mean)

    def state_dict(self) -> Dict[str, object]:
        return {"count": self.count, "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), state["mean"].clone(), state["m2"].clone()


class GradientStats:
    """Per-unit moments of the LM and constraint parts of the gate-logit gradient, [layers, units]."""

    def __init__(self, shape):
        self.lm = RunningMoments(shape)
        self.constraint = RunningMoments(shape)
        self.active = torch.zeros(shape, dtype=torch.float64)

    def update(self, lm_grad: torch.Tensor, constraint_grad: torch.Tensor) -> None:
        """One mask-learning step's two parts (``constraint_grad`` zeros for methods without one)."""
        self.lm.update(lm_grad)
        self.constraint.update(constraint_grad)
        self.active += (lm_grad.detach() != 0).to(torch.float64)

    def summary(self) -> Dict[str, object]:
        """JSON-ready figures, each [layers][units] (see the module docstring); {} before any step."""
        n = self.lm.count
        if n == 0:
            return {}
        lm_std = self.lm.std
        stderr = (lm_std / n**0.5).clamp_min(torch.finfo(torch.float64).tiny)
        separation = (self.lm.mean - self.lm.mean.mean()) / stderr
        return {
            "steps": n,
            "lm_mean": _rows(self.lm.mean),
            "lm_std": _rows(lm_std),
            "constraint_mean": _rows(self.constraint.mean),
            "constraint_std": _rows(self.constraint.std),
            "active_fraction": _rows(self.active / n),
            "separation": _rows(separation),
        }

    def state_dict(self) -> Dict[str, object]:
        return {"lm": self.lm.state_dict(), "constraint": self.constraint.state_dict(), "active": self.active.clone()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.lm.load_state_dict(state["lm"])
        self.constraint.load_state_dict(state["constraint"])
        self.active = state["active"].clone()


def _rows(t: torch.Tensor) -> List[List[float]]:
    return [[float(f"{x:.6g}") for x in row] for row in t.tolist()]
