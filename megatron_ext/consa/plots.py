"""PNG figures of a ConSA run: the allocation heatmap and log-alpha over time."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import torch

from megatron_ext.plotting import pyplot


def plot_allocation(
    path: Path, allocation: torch.Tensor, log_alpha: torch.Tensor | None, title: str, tie_margin: float = 0.0
) -> None:
    """Heatmap layers x units: full attention (dark) / SWA (light), with a legend saying so;
    log-alpha written in cells, and a unit whose log-alpha lies within ``tie_margin`` of a unit put on
    the other side (an undecided gate, a tie broken by rank) marked with ``~``."""
    from matplotlib.patches import Patch

    plt = pyplot()
    layers, units = allocation.shape
    fig, ax = plt.subplots(figsize=(max(5.5, 2.8 + 0.45 * units), max(2.5, 1.0 + 0.3 * layers)))
    ax.imshow(allocation.float().numpy(), cmap="Blues", vmin=-0.3, vmax=1.0, aspect="auto")
    if log_alpha is not None:
        full = log_alpha[allocation]
        swa = log_alpha[~allocation]
        for i in range(layers):
            for j in range(units):
                value = float(log_alpha[i, j])
                other = swa if allocation[i, j] else full
                tied = tie_margin > 0 and other.numel() > 0 and float((other - value).abs().min()) < tie_margin
                color = "white" if allocation[i, j] else "black"
                ax.text(j, i, f"{value:.1f}{'~' if tied else ''}", ha="center", va="center", fontsize=6, color=color)
    cmap = plt.get_cmap("Blues")
    handles = [Patch(color=cmap(1.0), label="full attention"), Patch(color=cmap(0.2), label="sliding window")]
    if log_alpha is not None:
        handles.append(Patch(color="white", label="cells: log alpha" + (" (~ undecided)" if tie_margin > 0 else "")))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6, frameon=False)
    ax.set_xlabel("KV head" if units > 1 else "")
    ax.set_ylabel("layer")
    ax.set_xticks(range(units))
    ax.set_yticks(range(layers))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_log_alpha_history(path: Path, history: List[Tuple[int, torch.Tensor]]) -> None:
    """Heat map units x steps of log alpha (diverging at 0: blue = towards full attention, red =
    towards SWA), one labelled row per unit (``L<layer>`` or ``L<layer>H<KV head>``)."""
    if not history:
        return
    plt = pyplot()
    steps = [s for s, _ in history]
    values = torch.stack([v for _, v in history])  # [T, L, U]
    layers, units = values.shape[1:]
    table = values.flatten(1).T.numpy()  # [L * U, T]
    labels = [f"L{i}" if units == 1 else f"L{i}H{j}" for i in range(layers) for j in range(units)]
    bound = max(float(values.abs().max()), 1e-3)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.8 + 0.16 * len(labels))))
    image = ax.imshow(
        table,
        aspect="auto",
        cmap="RdBu",
        vmin=-bound,
        vmax=bound,
        interpolation="nearest",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(labels) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=max(4, min(8, 300 // len(labels))))
    ax.set_xlabel("step")
    ax.set_title(f"gate logits (log alpha) of {len(labels)} units: > 0 full attention, < 0 SWA", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gate_diagnostics(path: Path, diagnostics: dict, log_alpha: torch.Tensor) -> None:
    """Two panels per unit (``L<layer>H<KV head>``): the LM and the constraint part of the gate-logit
    gradient over mask learning (mean, with the standard error of the LM mean as bars), and, when it
    was measured, each unit's own window cost against its final log alpha."""
    gradients = diagnostics.get("gradients") or {}
    if not gradients:
        return
    plt = pyplot()
    layers, units = log_alpha.shape
    labels = [f"L{i}" if units == 1 else f"L{i}H{j}" for i in range(layers) for j in range(units)]
    lm_mean = torch.tensor(gradients["lm_mean"]).flatten()
    stderr = torch.tensor(gradients["lm_std"]).flatten() / gradients["steps"] ** 0.5
    constraint = torch.tensor(gradients["constraint_mean"]).flatten()
    unit_cost = diagnostics.get("unit_window_cost")
    fig, axes = plt.subplots(1, 2 if unit_cost else 1, figsize=(10 if unit_cost else 6, 3.2), squeeze=False)
    ax = axes[0, 0]
    x = torch.arange(len(labels)).float()
    ax.bar(x - 0.2, lm_mean, 0.4, yerr=stderr, label="LM part (mean, +- s.e.)", color="tab:blue")
    ax.bar(x + 0.2, constraint, 0.4, label="constraint part (mean)", color="tab:orange")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xticks(x.tolist())
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    ax.set_ylabel("d loss / d log alpha")
    ax.set_title(f"gate gradient over {gradients['steps']} mask-learning steps (< 0 pushes towards FA)", fontsize=8)
    ax.legend(fontsize=6, frameon=False)
    if unit_cost:
        ax = axes[0, 1]
        cost = torch.tensor(unit_cost).flatten()
        ax.scatter(cost, log_alpha.flatten(), s=12)
        for label, c, a in zip(labels, cost.tolist(), log_alpha.flatten().tolist()):
            ax.annotate(label, (c, a), fontsize=5)
        ax.set_xlabel("window cost of the unit alone on SWA (nats)")
        ax.set_ylabel("final log alpha")
        ax.set_title("does ConSA keep the units that carry the window cost?", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
