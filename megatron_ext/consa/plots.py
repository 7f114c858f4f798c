"""PNG figures of a ConSA run: the allocation heatmap and log-alpha over time."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import torch

from megatron_ext.plotting import pyplot


def plot_allocation(path: Path, allocation: torch.Tensor, log_alpha: torch.Tensor | None, title: str) -> None:
    """Heatmap layers x units: full attention (dark) / SWA (light), log-alpha written in cells."""
    plt = pyplot()
    layers, units = allocation.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 0.45 * units), max(2.5, 1.0 + 0.3 * layers)))
    ax.imshow(allocation.float().numpy(), cmap="Blues", vmin=-0.3, vmax=1.0, aspect="auto")
    if log_alpha is not None:
        for i in range(layers):
            for j in range(units):
                ax.text(j, i, f"{float(log_alpha[i, j]):.1f}", ha="center", va="center", fontsize=6)
    ax.set_xlabel("KV head" if units > 1 else "")
    ax.set_ylabel("layer")
    ax.set_xticks(range(units))
    ax.set_yticks(range(layers))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_log_alpha_history(path: Path, history: List[Tuple[int, torch.Tensor]]) -> None:
    """One line per unit: log-alpha against the training step."""
    if not history:
        return
    plt = pyplot()
    steps = [s for s, _ in history]
    values = torch.stack([v.flatten() for _, v in history])  # [T, units]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values.numpy(), linewidth=0.7)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("log alpha")
    ax.set_title(f"gate logits of {values.shape[1]} units", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
