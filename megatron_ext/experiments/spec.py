"""An experiment spec: the grid of runs behind one comparison table, as YAML.

    name: consa_tiny
    base: configs/experiments/consa_tiny_base.yaml   # the run config every run starts from
    method: consa                                    # whose figures the report adds (consa | sgt | elastic | none)
    nproc: 1                                          # ranks per run (python -m pretrain.launch --nproc-per-node)
    seeds: [1234, 1235]                               # train.seed of every variant
    common: {train.steps: 200}                        # what every variant changes (before its own overrides)
    start:                                            # optional shared start: every variant begins from its
      name: dense_start                               # weights (train.init_from), with a fresh optimizer
      overrides: {train.steps: 1500}
    variants:
      - name: dense_fa
        overrides: {hybrid_attention.enabled: false}
      - name: consa_head_per_layer
        overrides: {hybrid_attention.enabled: true, hybrid_attention.method: consa}
        grid: {hybrid_attention.target: [0.5, 0.75]}  # one run per value (per combination of several)
    evaluations:
      validation_batches: 8                           # validation loss of each finished run
      tasks: []                                       # pretrain.evaluate --tasks (lm-eval, passkey, ...)
      subnetworks: [{name: depth_3, layers: 0-2}]     # validation loss of a sub-network (elastic)
      window_cost: 16                                 # the shared start's loss with every unit on SWA(W) - full
    columns: [tokens, train_flops, val_loss, consa/swa_fraction]

Overrides are ``section.key: value`` pairs, passed to the run as ``--set section.key=value``. Relative
paths (``base``, ``output``) are the caller's, as for every tool of the project. Runs go to
``output`` (default ``runs/experiments/<name>``): ``<output>/<start name>/`` and
``<output>/<variant>[-<grid key>=<value>...]/seed<seed>/``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import yaml

from megatron_ext.config import Checks, ConfigError
from megatron_ext.config.loader import from_dict, load_yaml

__all__ = ["ExperimentSpec", "PlannedRun", "load_spec", "plan_runs", "METHOD_COLUMNS", "COMMON_COLUMNS"]

COMMON_COLUMNS = ("tokens", "train_flops", "val_loss", "train_loss")
"""Figures every row has: tokens trained after the shared start (``train.steps`` x global batch x
sequence length), training FLOPs of those steps (the model FLOPs the run logs per token, summed over
its steps), the validation loss of the finished run, and its last logged training loss."""

METHOD_COLUMNS = {
    "consa": ("consa/swa_fraction", "consa/allocation", "consa/window_cost", "consa/polarized_fraction"),
    "sgt": ("sgt/looped_layers", "sgt/looped_heads", "sgt/flops_overhead_pct", "sgt/loop_depths"),
    "elastic": (),
    "none": (),
}
"""The method's own figures (see :mod:`megatron_ext.experiments.report`); elastic's are the
``sub/<name>`` losses of the evaluated sub-networks."""

DEFAULT_COLUMNS = ["tokens", "train_flops", "val_loss"]


def _check_overrides(c: Checks, name: str, overrides: Dict[str, Any]) -> None:
    for key in overrides:
        c.require(
            isinstance(key, str) and len(key.split(".")) >= 2 and all(key.split(".")),
            f"{name} key {key!r} is not section.key (e.g. train.steps)",
        )
        c.require(
            key not in ("train.seed", "data.seed", "train.init_from"),
            f"{name} sets {key}: the runner sets it (seeds: and start:), remove it",
        )


@dataclass(kw_only=True)
class StartSpec:
    """The shared start: one run of the base config with these overrides; every variant loads its
    weights (``train.init_from``) and trains on from step 0 with a fresh optimizer and data position."""

    name: str = "start"
    """Its directory under the experiment's output."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """``section.key: value`` changes to the base config for the start only."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.require(bool(self.name) and "/" not in self.name, f"name={self.name!r} must be a non-empty directory name")
        _check_overrides(c, "overrides", self.overrides)
        c.done()


@dataclass(kw_only=True)
class VariantSpec:
    """One row of the table (per seed), or a family of rows with ``grid``."""

    name: str
    """Its label in the table and its directory name."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """``section.key: value`` changes to the base config."""
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    """``section.key: [v1, v2, ...]``: one run per value (per combination of several keys), labelled
    ``<name>-<key>=<value>`` with the key's last part (e.g. ``consa-target=0.5``)."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.require(bool(self.name) and "/" not in self.name, f"name={self.name!r} must be a non-empty directory name")
        _check_overrides(c, "overrides", self.overrides)
        _check_overrides(c, "grid", self.grid)
        for key, values in self.grid.items():
            c.require(bool(values), f"grid {key!r} has no values: give a list of at least one")
            c.require(key not in self.overrides, f"grid {key!r} is also in overrides: keep it in one of them")
        c.done()

    def expand(self) -> List[tuple]:
        """``[(label, overrides)]``: one per grid combination (the variant itself without a grid)."""
        if not self.grid:
            return [(self.name, dict(self.overrides))]
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            label = "-".join([self.name] + [f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values)])
            out.append((label, {**self.overrides, **dict(zip(keys, values))}))
        return out


@dataclass(kw_only=True)
class SubnetworkSpec:
    """A sub-network the finished runs are also evaluated at (``pretrain.evaluate --layers / --experts
    / --top-k``); its validation loss is the column ``sub/<name>``."""

    name: str
    layers: Optional[str] = None
    """Kept layers, e.g. ``0-11`` (None: all)."""
    experts: Optional[str] = None
    """Kept experts, e.g. ``0-31`` (None: all)."""
    top_k: Optional[int] = None
    """Experts per token (None: the config's)."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.require(bool(self.name), "name must be non-empty")
        c.require(
            any(v is not None for v in (self.layers, self.experts, self.top_k)),
            f"subnetwork {self.name!r} keeps everything: give layers, experts or top_k",
        )
        c.positive("top_k")
        c.done()


@dataclass(kw_only=True)
class EvaluationSpec:
    """What is measured on every finished run (and on the shared start)."""

    validation_batches: int = 8
    """Global validation batches of the validation loss (``pretrain.evaluate --batches``)."""
    tasks: List[str] = field(default_factory=list)
    """Tasks of ``pretrain.evaluate --tasks``: lm-eval tasks, the project's ``mx_*`` tasks, and the
    long-context ones (``passkey``, ``needle``, ``extrapolation``); columns ``task/<task>/<metric>``."""
    task_limit: Optional[int] = None
    """Examples per task (``--limit``; None: all)."""
    task_options: Dict[str, str] = field(default_factory=dict)
    """``--option key=value`` settings of the project's own tasks (e.g. ``lengths: 256,512``)."""
    subnetworks: List[SubnetworkSpec] = field(default_factory=list)
    """Sub-networks each run is also evaluated at (elastic MoE)."""
    window_cost: Optional[int] = None
    """W: measure the shared start's window cost, its validation loss with every KV head on a sliding
    window of W keys minus the one with full attention (the same batches; reported beside the table).
    Needs ``start``."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.positive("validation_batches", "task_limit", "window_cost")
        names = [s.name for s in self.subnetworks]
        c.require(len(set(names)) == len(names), f"subnetworks: names {names} must be distinct")
        c.done()


@dataclass(kw_only=True)
class SlurmSpec:
    """How ``experiment run --slurm`` submits each run: one ``sbatch`` of the project's script."""

    script: str = "slurm/train_gpu.sbatch"
    """The sbatch script (slurm/train_gpu.sbatch or slurm/train_cpu.sbatch)."""
    nodes: int = 1
    """Nodes per run."""
    gpus_per_node: Optional[int] = None
    """GPUs per node (sbatch --gpus-per-node; None: the script's default). Ranks per node follow."""
    options: List[str] = field(default_factory=list)
    """More sbatch options, e.g. ``--time=12:00:00``, ``--partition=gpu``."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.positive("nodes", "gpus_per_node")
        for option in self.options:
            c.require(option.startswith("--"), f"options: {option!r} is not an sbatch --option")
        c.done()


@dataclass(kw_only=True)
class ExperimentSpec:
    """A comparison table: the base config, the shared start, the variants, seeds, evaluations, columns."""

    name: str
    """The experiment's name (default output ``runs/experiments/<name>``)."""
    base: str
    """The run config every run starts from (configs/*.yaml)."""
    description: str = ""
    """What the table compares; written at the head of results.md."""
    method: Literal["consa", "sgt", "elastic", "none"] = "none"
    """Whose own figures and plots the report adds."""
    output: Optional[str] = None
    """The experiment directory (default ``runs/experiments/<name>``)."""
    nproc: int = 1
    """Ranks per run on this machine (``pretrain.launch --nproc-per-node``)."""
    seeds: List[int] = field(default_factory=lambda: [1234])
    """``train.seed`` and ``data.seed`` (initialization, dropout, sample order) of each variant's runs:
    one row per variant and seed. The shared start keeps the base config's seeds."""
    start: Optional[StartSpec] = None
    """The shared start (None: every variant trains from scratch)."""
    common: Dict[str, Any] = field(default_factory=dict)
    """``section.key: value`` changes every variant makes to the base config (before its own), e.g.
    the steps after the shared start."""
    variants: List[VariantSpec] = field(default_factory=list)
    """The table's rows."""
    evaluations: EvaluationSpec = field(default_factory=EvaluationSpec)
    """What is measured on each finished run."""
    columns: List[str] = field(default_factory=lambda: list(DEFAULT_COLUMNS))
    """The table's columns, in order: ``tokens``, ``train_flops``, ``val_loss``, ``train_loss``, the
    method's figures (:data:`METHOD_COLUMNS`), ``sub/<name>`` and ``task/<task>/<metric>``."""
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    """``--slurm`` submission settings."""

    def __post_init__(self) -> None:
        c = Checks(self)
        c.require(bool(self.name) and "/" not in self.name, f"name={self.name!r} must be a non-empty directory name")
        c.positive("nproc")
        c.require(bool(self.seeds), "seeds is empty: give at least one seed")
        c.require(len(set(self.seeds)) == len(self.seeds), f"seeds={self.seeds} has a repeated seed")
        _check_overrides(c, "common", self.common)
        c.require(bool(self.variants), "variants is empty: give at least one variant (name + overrides)")
        labels = [label for v in self.variants for label, _ in v.expand()]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        c.require(not repeated, f"variants: labels {repeated} are given twice: rename a variant")
        if self.start is not None:
            c.require(self.start.name not in labels, f"start.name={self.start.name!r} is also a variant's name")
        c.require(
            self.evaluations.window_cost is None or self.start is not None,
            "evaluations.window_cost measures the shared start: give start, or remove window_cost",
        )
        allowed = set(COMMON_COLUMNS) | set(METHOD_COLUMNS[self.method])
        allowed |= {f"sub/{s.name}" for s in self.evaluations.subnetworks}
        for column in self.columns:
            if column.startswith("task/"):
                parts = column.split("/")
                c.require(
                    len(parts) == 3 and parts[1] in self.evaluations.tasks,
                    f"columns: {column!r} must be task/<task>/<metric> with <task> in evaluations.tasks "
                    f"({self.evaluations.tasks})",
                )
            else:
                c.require(
                    column in allowed,
                    f"columns: {column!r} is not a figure of this experiment: use one of {sorted(allowed)} "
                    "or task/<task>/<metric>",
                )
        c.done()

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / "experiments" / self.name


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the experiment and where it lives."""

    label: str
    """The variant's label (with its grid values), or the start's name."""
    seed: Optional[int]
    """``train.seed`` (None: the shared start, which keeps the base config's)."""
    run_dir: Path
    overrides: tuple
    """``section.key=value`` strings for ``--set``, in order."""
    is_start: bool = False

    @property
    def key(self) -> str:
        return self.label if self.seed is None else f"{self.label}/seed{self.seed}"


def _as_set(key: str, value: Any) -> str:
    """``key=value`` with the value in YAML flow form, as ``--set`` parses it back."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[:-3].strip()
    return f"{key}={text}"


def plan_runs(spec: ExperimentSpec) -> List[PlannedRun]:
    """Every run of ``spec`` in execution order: the shared start first, then each variant (grid
    combination) for each seed."""
    out = spec.output_dir
    runs: List[PlannedRun] = []
    start_dir = None
    if spec.start is not None:
        start_dir = out / spec.start.name
        overrides = tuple(_as_set(k, v) for k, v in spec.start.overrides.items())
        runs.append(PlannedRun(spec.start.name, None, start_dir, (f"name={spec.start.name}",) + overrides, True))
    for variant in spec.variants:
        for label, overrides in variant.expand():
            for seed in spec.seeds:
                merged = {**spec.common, **overrides}
                sets = (
                    [f"name={label}"]
                    + [_as_set(k, v) for k, v in merged.items()]
                    + [f"train.seed={seed}", f"data.seed={seed}"]
                )
                if start_dir is not None:
                    sets.append(f"train.init_from={start_dir}")
                runs.append(PlannedRun(label, seed, out / label / f"seed{seed}", tuple(sets)))
    return runs


def load_spec(path) -> ExperimentSpec:
    """Read and check an experiment spec; every problem in one :class:`ConfigError`, the base config
    and every run's resolved config included (so a typo in a variant fails before any run starts)."""
    from megatron_ext.run import load_config

    path = Path(path)
    spec = from_dict(ExperimentSpec, load_yaml(path))
    problems = []
    if not Path(spec.base).is_file():
        problems.append(f"base: {spec.base} does not exist (a path from the current directory)")
    else:
        for run in plan_runs(spec):
            overrides = [o for o in run.overrides if not o.startswith("train.init_from=")]
            try:
                load_config(spec.base, overrides)
            except ConfigError as err:
                problems.extend(f"{run.key}: {p}" for p in err.problems)
    if problems:
        raise ConfigError(problems)
    return spec
