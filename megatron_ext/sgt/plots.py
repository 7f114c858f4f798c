"""PNG figure of an SGT run: the layers' entropy scores over the steps, with the growth events."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

from megatron_ext.plotting import pyplot


def plot_entropy(path: Path, history: List[list], events: List[dict], final_step: Optional[int] = None) -> None:
    """One line per layer (its EMA entropy score, ``history`` = ``[[step, [score per layer]], ...]``,
    nan where not observed yet); a vertical line in the layer's colour at each selection (solid) or
    deepening (dotted), and a grey dashed one at the freeze. The x axis runs to ``final_step`` (the
    run's last step); the part after the last measurement is shaded (entropy no longer tracked)."""
    plt = pyplot()
    steps = [entry[0] for entry in history]
    num_layers = len(history[0][1])
    colours = plt.get_cmap("tab20" if num_layers > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for layer in range(num_layers):
        scores = [entry[1][layer] for entry in history]
        if any(math.isfinite(v) for v in scores):
            ax.plot(steps, scores, linewidth=1.0, color=colours(layer % colours.N), label=str(layer))
    for event in events:
        if event["layer"] is None:
            ax.axvline(event["step"], color="grey", linestyle="--", linewidth=0.8)
        else:
            ax.axvline(
                event["step"],
                color=colours(event["layer"] % colours.N),
                linewidth=1.2,
                linestyle="-" if event["kind"] == "select" else ":",
            )
    if final_step is not None and steps and final_step > steps[-1]:
        ax.axvspan(steps[-1], final_step, color="0.92", zorder=0, label="not measured")
        ax.set_xlim(right=final_step)
    ax.set_xlabel("step")
    ax.set_ylabel("layer score (mean head entropy, EMA)")
    ax.set_title("SGT: entropy per layer; lines: select (solid), deepen (dotted), freeze (grey)", fontsize=8)
    ax.legend(
        title="layer",
        fontsize=6,
        title_fontsize=7,
        ncol=2 if num_layers > 8 else 1,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
