"""Hard-concrete L0 gates that choose, per unit, full attention (z = 1) or sliding-window attention (z = 0).

A unit is a decoder layer (``units_per_layer = 1``) or one KV head of a layer (``units_per_layer`` =
number of KV heads). Each unit owns one learnable location ``log_alpha``; its gate ``z`` follows the
hard concrete distribution of Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0
Regularization" (ICLR 2018, arXiv 1712.01312) [paper], the section "Hard concrete distribution":

    u ~ U(eps, 1 - eps)
    s = sigmoid((ln u - ln(1 - u) + log_alpha) / beta)          binary concrete sample
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)                 stretched to (gamma, zeta), then hard-sigmoid

Because the stretch puts mass beyond [0, 1], z is exactly 0 or exactly 1 with positive probability,
and the probability that a gate is open has a closed form (the paper's expected L0 norm) [paper]:

    P(z != 0) = 1 - Q(s <= 0) = sigmoid(log_alpha - beta * ln(-gamma / zeta))

so the expected fraction of SWA units, ``mean(1 - P(z != 0))``, is differentiable in ``log_alpha``.
The evaluation gate [code] and the exact-count binarization [choice] follow LLM-Shearing (Xia et
al. 2024, ``llmshearing/models/l0_module.py``): the deterministic gate scales the logit by 0.8, and the final
mask closes exactly round(rho * N) gates, those with the lowest ``log_alpha``.

The module holds one scalar per unit, so it is meant to be kept whole on every rank; a pipeline stage
reads the rows of its own layers.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from megatron_ext.consa.config import CONSTRAINT_MODES, ConstraintMode, HardConcreteConfig


def _check_mode(mode: str) -> None:
    if mode not in CONSTRAINT_MODES:
        raise ValueError(f"mode={mode!r} is not allowed: use one of {' | '.join(map(repr, CONSTRAINT_MODES))}")


class HardConcreteGates(torch.nn.Module):
    """One hard-concrete gate per unit: ``log_alpha`` of shape [num_layers, units_per_layer].

    ``z = 1`` means the unit uses full attention, ``z = 0`` sliding-window attention. In training
    mode ``forward()`` draws a differentiable sample, in eval mode it returns the deterministic gate.

    Noise: ``sample(step=s)`` draws layer l's uniforms from a CPU generator seeded by
    ``(noise_seed, s, l)`` only, so every rank that computes layer l in step s (its TP, CP and EP
    peers, whichever pipeline stage holds it) uses the same z, on CPU and GPU alike, whatever else
    consumed random numbers, and a resumed run draws the same z again; every micro-batch (and an
    activation recomputation) of step s sees the same z. [choice] ``sample()`` without a step draws
    from torch's default generator instead (standalone use).

    The optimizer should not apply weight decay to ``log_alpha`` (decay would pull every gate towards
    P(z != 0) ~ 0.83, its value at log_alpha = 0) and must call ``clamp_()`` after each step.
    """

    def __init__(
        self,
        num_layers: int,
        units_per_layer: int = 1,
        config: HardConcreteConfig | None = None,
        generator: torch.Generator | None = None,
        noise_seed: int = 0,
    ):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("units_per_layer", units_per_layer)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: use an integer >= 1")
        self.config = config if config is not None else HardConcreteConfig()
        self.num_layers = num_layers
        self.units_per_layer = units_per_layer
        self.noise_seed = noise_seed
        # [num_layers, units_per_layer]
        self.log_alpha = torch.nn.Parameter(torch.empty(num_layers, units_per_layer))
        with torch.no_grad():
            # A dedicated generator lets every rank draw the same initial logits.
            self.log_alpha.normal_(self.config.init_mean, self.config.init_std, generator=generator)

    def noise(self, step: int, layer: int) -> torch.Tensor:
        """Layer ``layer``'s uniforms of step ``step``, float32 ``[units_per_layer]`` in (eps, 1 - eps),
        from a generator seeded by ``(noise_seed, step, layer)`` (the same on every rank)."""
        seed = int(np.random.SeedSequence([self.noise_seed, step, layer]).generate_state(1)[0])
        u = torch.rand(self.units_per_layer, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        eps = self.config.eps
        return u * (1.0 - 2.0 * eps) + eps

    def sample(self, step: Optional[int] = None, layer: Optional[int] = None) -> torch.Tensor:
        """Training gate ``z`` in [0, 1], differentiable w.r.t. log_alpha: [num_layers, units_per_layer],
        or ``[units_per_layer]`` of ``layer``.

        u ~ U(eps, 1 - eps); s = sigmoid((ln u - ln(1 - u) + log_alpha) / beta);
        z = clamp(s * (zeta - gamma) + gamma, 0, 1). [paper] The noise is :meth:`noise` of ``step``
        (rank-consistent), or torch's default generator when ``step`` is None.
        """
        c = self.config
        # float32 whatever the parameter dtype: 1 - eps = 1 - 1e-6 is not representable in bf16/fp16.
        log_alpha = self.log_alpha.float()
        layers = range(self.num_layers) if layer is None else [layer]
        if step is None:
            u = torch.empty(len(layers), self.units_per_layer).uniform_(c.eps, 1.0 - c.eps)
        else:
            u = torch.stack([self.noise(step, i) for i in layers])  # [layers, U]
        log_alpha = log_alpha if layer is None else log_alpha[layer : layer + 1]
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / c.beta)
        z = torch.clamp(s * (c.zeta - c.gamma) + c.gamma, 0.0, 1.0)
        return z if layer is None else z[0]

    def deterministic(self) -> torch.Tensor:
        """Evaluation gate, [num_layers, units_per_layer]: the LLM-Shearing estimator [code]

            z = clamp(sigmoid(log_alpha / beta * 0.8) * (zeta - gamma) + gamma, 0, 1).

        The paper's test-time estimator is the same expression without the 1/beta * 0.8 logit scale
        [paper].
        """
        c = self.config
        s = torch.sigmoid(self.log_alpha.float() / c.beta * 0.8)
        return torch.clamp(s * (c.zeta - c.gamma) + c.gamma, 0.0, 1.0)

    @torch.no_grad()
    def expected_gate(self, points: int = 1024) -> torch.Tensor:
        """E[z] per unit, [num_layers, units_per_layer]: the mean gate over the noise, by the midpoint
        rule over u in (0, 1) (``points`` nodes; z is monotone in u, the error is below 1 / points)."""
        c = self.config
        u = (torch.arange(points, dtype=torch.float64) + 0.5) / points  # [P]
        logit = (torch.log(u) - torch.log1p(-u)).view(1, 1, -1)
        s = torch.sigmoid((logit + self.log_alpha.detach().double().unsqueeze(-1)) / c.beta)
        return torch.clamp(s * (c.zeta - c.gamma) + c.gamma, 0.0, 1.0).mean(-1).float()

    def prob_nonzero(self, log_alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        """P(z != 0) = sigmoid(log_alpha - beta * ln(-gamma / zeta)) [paper], [num_layers, units_per_layer],
        of these gates or of the given ``log_alpha``.

        z = 0 exactly when the stretched sample s * (zeta - gamma) + gamma is <= 0, i.e. s <= -gamma /
        (zeta - gamma); inverting the binary concrete CDF at that point gives this closed form.
        """
        c = self.config
        log_alpha = self.log_alpha if log_alpha is None else log_alpha
        return torch.sigmoid(log_alpha.float() - c.beta * math.log(-c.gamma / c.zeta))

    def expected_swa_fraction(
        self, mode: ConstraintMode = "global", log_alpha: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Expected fraction of units using SWA, rho_hat = mean_u (1 - P(z_u != 0)) [digest], of these
        gates or of the given ``log_alpha``.

        ``"global"``: one scalar over all units of all layers; ``"per_layer"``: [num_layers], each
        layer's mean over its own units.
        """
        _check_mode(mode)
        swa = 1.0 - self.prob_nonzero(log_alpha)  # [L, U]
        return swa.mean() if mode == "global" else swa.mean(dim=1)

    def forward(self) -> torch.Tensor:
        """``sample()`` in training mode, ``deterministic()`` in eval mode; [num_layers, units_per_layer]."""
        return self.sample() if self.training else self.deterministic()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp log_alpha in place to [log_alpha_min, log_alpha_max]; call after each optimizer step.

        Without the bound a gate that is never sampled open (or never closed) keeps drifting, and
        would take arbitrarily many steps to come back when the constraint changes. An optimizer that
        keeps separate fp32 master weights must have those clamped, not only this parameter.
        """
        self.log_alpha.clamp_(self.config.log_alpha_min, self.config.log_alpha_max)

    @torch.no_grad()
    def binarize(self, rho: float, mode: ConstraintMode = "global", rule: str = "exact_target") -> torch.Tensor:
        """Final mask, torch.bool [num_layers, units_per_layer]: True = full attention, False = SWA.

        ConSA's rule is z = 1[log_alpha > 0] [digest] (``rule="sign"``, whatever fraction it gives).
        [choice] By default (``"exact_target"``), following LLM-Shearing's evaluation mask, the number
        of SWA units is instead made exact: the round(rho * N) units with the lowest log_alpha become
        SWA, N being all units (``"global"``) or each layer's units (``"per_layer"``, so every layer
        gets round(rho * units_per_layer)). ``round`` is Python's, which rounds halves to even.
        [choice] Ties go by unit index (row-major over [layer, unit]): the lower index becomes SWA first.
        """
        _check_mode(mode)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho={rho!r} is not allowed: use a fraction in [0, 1]")
        if rule not in ("exact_target", "sign"):
            raise ValueError(f"rule={rule!r} is not allowed: use 'exact_target' or 'sign'")
        log_alpha = self.log_alpha.detach()
        if rule == "sign":
            return log_alpha > 0
        full = torch.ones_like(log_alpha, dtype=torch.bool)  # [L, U]
        if mode == "global":
            k = round(rho * log_alpha.numel())
            # A stable ascending sort keeps equal values in index order, which is the tie rule.
            order = torch.sort(log_alpha.flatten(), stable=True).indices  # [L * U]
            full.view(-1)[order[:k]] = False
        else:
            k = round(rho * self.units_per_layer)
            order = torch.sort(log_alpha, dim=1, stable=True).indices  # [L, U]
            full.scatter_(1, order[:, :k], False)
        return full

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, units_per_layer={self.units_per_layer}"


class ScalarGates(HardConcreteGates):
    """The "scalar gates + ranking" ablation: a deterministic continuous gate per unit.

    z_u = sigmoid(log_alpha_u) mixes full and sliding-window attention during stage 1 (no noise, no
    L0 penalty, no constraint, as LoZA's scalar gates); at binarization the round(rho * N)
    lowest-ranked units become SWA (the inherited :meth:`binarize`). ``prob_nonzero`` reports the
    mean gate, so the "expected SWA fraction" metric reads as the mean weight given to SWA.
    """

    def sample(self, step: Optional[int] = None, layer: Optional[int] = None) -> torch.Tensor:
        z = torch.sigmoid(self.log_alpha.float())
        return z if layer is None else z[layer]

    def deterministic(self) -> torch.Tensor:
        return self.sample()

    def expected_gate(self, points: int = 1024) -> torch.Tensor:
        return self.sample().detach()

    def prob_nonzero(self, log_alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.sigmoid((self.log_alpha if log_alpha is None else log_alpha).float())
