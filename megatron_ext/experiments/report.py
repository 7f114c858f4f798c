"""Collect an experiment's finished runs into ``results.json`` / ``results.md`` and its plots.

One row per variant and seed, then per variant the mean and the spread (sample standard deviation,
n - 1; blank for one seed) of every numeric column over its seeds. The figures of a row:

* ``tokens``: tokens trained after the shared start, ``train.steps`` x global batch x sequence length;
* ``train_flops``: the run's training FLOPs, the ``model_flops_per_token`` its metrics log (the model
  FLOP counter, :mod:`megatron_ext.models.flops`, as the method's callbacks adjust it step by step)
  times the tokens of the steps each logged record stands for;
* ``val_loss``: the validation loss of the finished run (``pretrain.evaluate``); ``train_loss``: its
  last logged training loss (mean over the last log interval);
* ConSA: ``consa/swa_fraction`` and ``consa/allocation`` (per layer, ``F`` full / ``S`` sliding window
  per unit) of the static allocation, ``consa/window_cost`` measured at the start of mask learning,
  ``consa/polarized_fraction`` (decided gates at binarization);
* SGT: ``sgt/looped_layers``, ``sgt/looped_heads`` (heads looped x loop depth, summed over layers),
  ``sgt/flops_overhead_pct`` (extra training FLOPs of the loops over the vanilla model, last step),
  ``sgt/loop_depths``;
* ``sub/<name>``: the validation loss at a sub-network; ``task/<task>/<metric>``: task scores.

Plots in ``<output>/plots/``: ``loss.png`` (training loss of every run against tokens after the start,
validation losses as markers); ConSA: ``allocation_<label>.png`` per learned allocation
(:func:`megatron_ext.consa.plots.plot_allocation`) and ``swa_profile.png`` (SWA fraction per layer);
SGT: ``growth.png`` (looped layers over the steps); elastic: ``subnetworks.png``.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from megatron_ext.experiments.runner import read_done
from megatron_ext.experiments.spec import ExperimentSpec, PlannedRun, plan_runs

__all__ = ["collect_rows", "write_report", "training_flops"]


def _metrics(run_dir: Path) -> List[dict]:
    """The run's logged records, one per step (a step logged twice, by a run resumed from an older
    checkpoint, keeps its last record), in step order."""
    from megatron_ext.training.rundir import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    by_step = {r["step"]: r for r in read_metrics(path)} if path.is_file() else {}
    return [by_step[s] for s in sorted(by_step)]


def training_flops(records: List[dict], tokens_per_step: int) -> float:
    """Sum over logged records of ``model_flops_per_token`` x the tokens of the steps since the previous
    record (exact with ``logging.log_interval: 1``; else each record stands for its interval)."""
    total, previous = 0.0, 0
    for record in records:
        total += record["model_flops_per_token"] * (record["step"] - previous) * tokens_per_step
        previous = record["step"]
    return total


def _consa_figures(run_dir: Path, cfg) -> Dict[str, object]:
    from megatron_ext.consa.allocation import rule_head_allocation, rule_layer_allocation, rule_layer_pattern

    h = cfg.hybrid_attention
    path = Path(run_dir) / "allocation.json"
    figures: Dict[str, object] = {}
    if path.is_file():
        record = json.loads(path.read_text())
        rows = [layer["full_attention"] for layer in sorted(record["layers"], key=lambda x: x["layer"])]
        diagnostics = record.get("diagnostics") or {}
        if diagnostics.get("polarized_fraction") is not None:
            figures["consa/polarized_fraction"] = float(diagnostics["polarized_fraction"])
        if diagnostics.get("window_cost") is not None:
            figures["consa/window_cost"] = float(diagnostics["window_cost"])
    elif h.enabled and h.method in ("rule_head", "rule_layer"):
        kv_heads = cfg.model.num_query_groups or cfg.model.num_attention_heads
        allocation = (
            rule_head_allocation(cfg.model.num_layers, kv_heads, h.target)
            if h.method == "rule_head"
            else rule_layer_allocation(
                cfg.model.num_layers, h.layer_pattern or rule_layer_pattern(cfg.model.num_layers, h.target)
            )
        )
        rows = allocation.int().tolist()
    elif not h.enabled:
        rows = [[1] for _ in range(cfg.model.num_layers)]
    else:
        return figures
    units = [u for row in rows for u in row]
    figures["consa/swa_fraction"] = 1.0 - sum(units) / len(units)
    figures["consa/allocation"] = " ".join("".join("F" if u else "S" for u in row) for row in rows)
    return figures


def _sgt_figures(records: List[dict], cfg) -> Dict[str, object]:
    last = next((r for r in reversed(records) if "sgt/loop_depths" in r), None)
    if last is None:
        return {}
    depths = list(last["sgt/loop_depths"])
    per_loop = cfg.looping.num_keep_heads if cfg.looping.method == "sgt" else cfg.model.num_attention_heads
    return {
        "sgt/looped_layers": sum(1 for d in depths if d),
        "sgt/looped_heads": sum(d * per_loop for d in depths),
        "sgt/flops_overhead_pct": 100.0 * float(last["sgt/flops_overhead"]),
        "sgt/loop_depths": " ".join(str(d) for d in depths),
    }


def _row(spec: ExperimentSpec, run: PlannedRun) -> Optional[dict]:
    from megatron_ext.run import load_config

    done = read_done(run.run_dir)
    if done is None:
        return None
    cfg = load_config(run.run_dir / "config.yaml")
    records = _metrics(run.run_dir)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
    row: Dict[str, object] = {
        "variant": run.label,
        "seed": run.seed,
        "run_dir": str(run.run_dir),
        "tokens": cfg.train.steps * tokens_per_step,
        "train_flops": training_flops(records, tokens_per_step),
        "train_loss": next((r.get("loss/interval_mean", r["loss"]) for r in reversed(records)), math.nan),
        **done["figures"],
    }
    if spec.method == "consa":
        row.update(_consa_figures(run.run_dir, cfg))
    elif spec.method == "sgt":
        row.update(_sgt_figures(records, cfg))
    return row


def collect_rows(spec: ExperimentSpec) -> Dict[str, object]:
    """``{"rows": [...], "summary": [...], "missing": [run keys], "start": {...}}`` of the finished runs."""
    rows, missing, start = [], [], None
    for run in plan_runs(spec):
        if run.is_start:
            done = read_done(run.run_dir)
            start = {"run_dir": str(run.run_dir), **(done["figures"] if done else {})}
            continue
        row = _row(spec, run)
        if row is None:
            missing.append(run.key)
        else:
            rows.append(row)
    summary = []
    for label in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == label]
        entry: Dict[str, object] = {"variant": label, "seeds": [r["seed"] for r in group]}
        for column in spec.columns:
            values = [r.get(column) for r in group]
            if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                mean = statistics.fmean(values)
                entry[column] = int(mean) if all(isinstance(v, int) for v in values) and mean.is_integer() else mean
                entry[f"{column}_spread"] = statistics.stdev(values) if len(values) > 1 else None
            elif values and len({str(v) for v in values}) == 1:
                entry[column] = values[0]
        summary.append(entry)
    return {
        "experiment": spec.name,
        "rows": rows,
        "summary": summary,
        "paired": paired_differences(rows),
        "missing": missing,
        "start": start,
    }


def paired_differences(rows: List[dict], column: str = "val_loss") -> List[dict]:
    """Each variant's ``column`` minus the first variant's (the baseline) at the same seed, and their
    mean and sample standard deviation. A seed fixes the data order and the validation split, so the
    spread between seeds of one variant is mostly the split's; the paired difference is what compares
    two variants (the papers' seeds are equal across variants, too)."""
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    if not labels:
        return []
    baseline = {r["seed"]: r.get(column) for r in rows if r["variant"] == labels[0]}
    out = []
    for label in labels[1:]:
        diffs = {
            r["seed"]: r[column] - baseline[r["seed"]]
            for r in rows
            if r["variant"] == label and isinstance(r.get(column), (int, float)) and baseline.get(r["seed"]) is not None
        }
        if not diffs:
            continue
        values = list(diffs.values())
        out.append(
            {
                "variant": label,
                "baseline": labels[0],
                "column": column,
                "per_seed": diffs,
                "mean": statistics.fmean(values),
                "spread": statistics.stdev(values) if len(values) > 1 else None,
                "better_in": sum(v < 0 for v in values),
            }
        )
    return out


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3e}" if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3) else f"{value:.4f}"
    return str(value)


def _markdown(spec: ExperimentSpec, results: dict) -> str:
    columns = spec.columns
    lines = [f"# {spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    start = results["start"]
    if start is not None:
        lines.append(
            f"Shared start: `{start['run_dir']}`"
            + (f", validation loss {start['val_loss']:.4f}" if "val_loss" in start else "")
        )
        if "window_cost" in start:
            lines.append(
                f"Window cost of the shared start (W={spec.evaluations.window_cost}): {start['window_cost']:+.4f} nats "
                f"({start['val_loss_all_swa']:.4f} with every KV head on the window vs {start['val_loss']:.4f})."
            )
        lines.append("")
    lines += ["## Runs", "", "| variant | seed | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in results["rows"]:
        lines.append(f"| {row['variant']} | {row['seed']} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    lines += ["", "## Mean over seeds (± sample standard deviation)", ""]
    lines += ["| variant | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for entry in results["summary"]:
        cells = []
        for c in columns:
            spread = entry.get(f"{c}_spread")
            cells.append(_cell(entry.get(c)) + (f" ± {_cell(spread)}" if spread else ""))
        lines.append(f"| {entry['variant']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    if results["paired"]:
        first = results["paired"][0]
        lines += [
            "",
            f"## {first['column']} minus {first['baseline']}'s at the same seed (negative: lower than the baseline)",
            "",
            "| variant | per seed | mean ± sample std | lower in |",
            "|---|---|---|---|",
        ]
        for entry in results["paired"]:
            per_seed = ", ".join(f"{seed}: {value:+.4f}" for seed, value in entry["per_seed"].items())
            spread = "" if entry["spread"] is None else f" ± {entry['spread']:.4f}"
            lines.append(
                f"| {entry['variant']} | {per_seed} | {entry['mean']:+.4f}{spread} | "
                f"{entry['better_in']} of {len(entry['per_seed'])} seeds |"
            )
    if results["missing"]:
        lines += ["", f"Not finished (run `megatron-ext experiment run` again): {', '.join(results['missing'])}"]
    return "\n".join(lines) + "\n"


def _plot_losses(path: Path, spec: ExperimentSpec, rows: List[dict]) -> None:
    from megatron_ext.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.get_cmap("tab20" if len(rows) > 10 else "tab10")
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    for row in rows:
        records = _metrics(Path(row["run_dir"]))
        tokens_per_step = row["tokens"] / max(1, records[-1]["step"]) if records else 0
        colour = colours(labels.index(row["variant"]) % colours.N)
        train = [(r["step"] * tokens_per_step, r["loss"]) for r in records if math.isfinite(r["loss"])]
        if train:
            ax.plot(*zip(*train), color=colour, linewidth=0.8, alpha=0.8, label=f"{row['variant']} s{row['seed']}")
        valid = [(r["step"] * tokens_per_step, r["val/loss"]) for r in records if "val/loss" in r]
        if valid:
            ax.plot(*zip(*valid), "o", color=colour, markersize=3)
    ax.set_xlabel("tokens after the shared start" if spec.start is not None else "tokens")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{spec.name}: training loss (lines), validation loss (dots)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_consa(plots: Path, rows: List[dict]) -> List[Path]:
    import torch

    from megatron_ext.consa.plots import plot_allocation
    from megatron_ext.experiments.analysis import plot_swa_profile, swa_profile

    written, profiles = [], {}
    for row in rows:
        path = Path(row["run_dir"]) / "allocation.json"
        if not path.is_file():
            continue
        name = f"{row['variant']} s{row['seed']}"
        profiles[name] = swa_profile(path)
        record = json.loads(path.read_text())
        layers = sorted(record["layers"], key=lambda x: x["layer"])
        allocation = torch.tensor([layer["full_attention"] for layer in layers], dtype=torch.bool)
        log_alpha = torch.tensor([layer["log_alpha"] for layer in layers]) if "log_alpha" in layers[0] else None
        out = plots / f"allocation_{row['variant']}_seed{row['seed']}.png"
        plot_allocation(out, allocation, log_alpha, f"{name}: learned allocation")
        written.append(out)
    if profiles:
        out = plots / "swa_profile.png"
        plot_swa_profile(out, profiles, "SWA fraction per layer of the learned allocations")
        written.append(out)
    return written


def _plot_growth(path: Path, rows: List[dict]) -> bool:
    from megatron_ext.plotting import pyplot

    series = {}
    for row in rows:
        records = [r for r in _metrics(Path(row["run_dir"])) if "sgt/looped_layers" in r]
        if records:
            series[f"{row['variant']} s{row['seed']}"] = [(r["step"], r["sgt/looped_layers"]) for r in records]
    if not series:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        ax.step(*zip(*points), where="post", label=label, linewidth=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("looped layers")
    ax.set_title("growth timeline: layers with a loop", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_subnetworks(path: Path, spec: ExperimentSpec, summary: List[dict]) -> bool:
    from megatron_ext.plotting import pyplot

    names = ["val_loss"] + [f"sub/{s.name}" for s in spec.evaluations.subnetworks]
    if len(names) == 1 or not summary:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(summary)
    for i, entry in enumerate(summary):
        values = [entry.get(n, math.nan) for n in names]
        errors = [entry.get(f"{n}_spread") or 0.0 for n in names]
        ax.bar([j + i * width for j in range(len(names))], values, width, yerr=errors, label=entry["variant"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(["full"] + [s.name for s in spec.evaluations.subnetworks], fontsize=7)
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss of each sub-network", fontsize=9)
    finite = [v for e in summary for v in (e.get(n) for n in names) if isinstance(v, float) and math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) - 0.1 * (max(finite) - min(finite) + 0.1), max(finite) * 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(spec: ExperimentSpec) -> Dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``plots/`` into the experiment directory; returns
    their paths (``{"json", "markdown", "plots"}``)."""
    out = spec.output_dir
    results = collect_rows(spec)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    figures: List[Path] = []
    if results["rows"]:
        _plot_losses(plots / "loss.png", spec, results["rows"])
        figures.append(plots / "loss.png")
    if spec.method == "consa":
        figures += _plot_consa(plots, results["rows"])
    elif spec.method == "sgt" and _plot_growth(plots / "growth.png", results["rows"]):
        figures.append(plots / "growth.png")
    elif spec.method == "elastic" and _plot_subnetworks(plots / "subnetworks.png", spec, results["summary"]):
        figures.append(plots / "subnetworks.png")
    results["plots"] = [str(p) for p in figures]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(_markdown(spec, results))
    return {"json": out / "results.json", "markdown": out / "results.md", "plots": plots}
