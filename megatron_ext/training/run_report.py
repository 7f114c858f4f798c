"""What a finished run leaves for its user: a loss curve in ``plots/`` and a closing summary (the loss
from first to last step, the last validation loss, where the metrics, plots and checkpoints are).
Both read the run's own ``metrics.jsonl``, so a resumed run reports its whole history."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

__all__ = ["plot_loss_curve", "run_summary"]


def _records(run_dir: Path) -> List[dict]:
    from megatron_ext.training.rundir import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def plot_loss_curve(run_dir: Path) -> Optional[Path]:
    """``plots/loss.png``: training loss per logged step and validation loss where measured (None
    when the run logged nothing)."""
    from megatron_ext.plotting import pyplot

    records = _records(run_dir)
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    if not train:
        return None
    valid = [(r["step"], r["val/loss"]) for r in records if isinstance(r.get("val/loss"), float)]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.5))
    ax.plot(*zip(*train), label="training loss (per logged step)", linewidth=1.0)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(run_dir) / "plots" / "loss.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_summary(run_dir: Path, final_step: int, stopped: bool) -> str:
    """Lines that close a run's log: losses, and the files the user looks at next."""
    run_dir = Path(run_dir)
    records = _records(run_dir)
    losses = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]
    valid = [(r["step"], r["val/loss"]) for r in records if isinstance(r.get("val/loss"), float)]
    ending = f"stopped at step {final_step} by a signal" if stopped else f"finished at step {final_step}"
    lines = [f"run {ending}"]
    if losses:
        (first_step, first), (last_step, last) = losses[0], losses[-1]
        lines.append(f"  loss {first:.4f} (step {first_step}) -> {last:.4f} (step {last_step})")
    if valid:
        lines.append(f"  validation loss {valid[-1][1]:.4f} (step {valid[-1][0]})")
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    lines.append(f"  metrics:     {run_dir / 'metrics.jsonl'}")
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    if plots:
        lines.append(f"  plots:       {run_dir / 'plots'}/ ({', '.join(plots)})")
    if checkpoints:
        lines.append(f"  checkpoint:  {checkpoints[-1]}")
    return "\n".join(lines)
