"""Weights & Biases logging (``logging.wandb``, the ``wandb`` extra), rank 0 only.

What goes to TensorBoard goes to W&B, under the same names and steps: every finite number of a
metrics.jsonl record, a list-valued metric as one scalar per element (``name/<index>``). The run's
config is the resolved ``config.yaml``; the PNG files of ``<run-dir>/plots`` are logged as images
when they appear or change (and at a resumed run's first record). The files live in
``<run-dir>/wandb/``, and the W&B run id in ``<run-dir>/wandb/run_id``: a resumed run continues the
same W&B run (``resume="allow"``), and W&B drops the history it receives again for steps it
already has.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from pathlib import Path
from typing import Any, Dict


def scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """The scalars of a metrics record as TensorBoard gets them (``step`` left out)."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        values = {f"{key}/{i}": v for i, v in enumerate(value)} if isinstance(value, (list, tuple)) else {key: value}
        for name, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[name] = v
    return out


class WandbLogger:
    """One W&B run per run directory."""

    def __init__(self, cfg, run_dir: Path):
        try:
            import wandb
        except ImportError:  # the run checks refuse this before any work; a library caller may not have run them
            raise RuntimeError(
                "logging.wandb.mode is not 'disabled' but wandb is not installed: pip install '.[wandb]'"
            ) from None
        w = cfg.logging.wandb
        self.dir = Path(run_dir) / "wandb"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plots = Path(run_dir) / "plots"
        self.plot_mtimes: Dict[Path, float] = {}
        id_file = self.dir / "run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name or cfg.name,
            tags=list(w.tags) or None,
            mode=w.mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=dataclasses.asdict(cfg),
        )

    def log(self, record: Dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))
        self.log_plots(int(record["step"]))

    def log_plots(self, step: int) -> None:
        """Each PNG of the plots directory that is new or changed since it was last logged."""
        changed = {}
        for path in sorted(self.plots.glob("*.png")) if self.plots.is_dir() else []:
            mtime = path.stat().st_mtime
            if self.plot_mtimes.get(path) != mtime:
                self.plot_mtimes[path] = mtime
                changed[f"plots/{path.stem}"] = self.wandb.Image(str(path))
        if changed:
            self.run.log(changed, step=step)

    def finish(self, final_step: int) -> None:
        self.log_plots(final_step)  # the plots callbacks draw at the end of the run
        self.run.finish()
