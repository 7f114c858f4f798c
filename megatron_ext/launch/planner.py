"""Launch planner: check a config against a GPU allocation, lay out its ranks, estimate memory.

    python -m pretrain.plan --config configs/NAME.yaml --nodes N --gpus-per-node G \
        [--set section.key=value ...] [--emit-sbatch]

The plan is what a job of N * G ranks would do, worked out on one CPU process: the same checks
the training entry runs (``check_run`` with world = N * G and CUDA), every rank's coordinates in
Megatron's rank order (:mod:`megatron_ext.launch.layout`), the ranks of each group, warnings for
groups that should stay inside a node, and a per-GPU memory estimate
(:mod:`megatron_ext.launch.memory`). Inside a SLURM allocation the node and GPU counts are
compared with the allocation's.
"""

from __future__ import annotations

import os
import shlex
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from megatron_ext.config import ConfigError
from megatron_ext.launch.layout import INTRA_NODE_KINDS, Layout
from megatron_ext.launch.memory import GIB, ParamInventory, StageMemory, bytes_per_parameter, estimate_memory
from megatron_ext.run import RunConfig, check_run, routed_experts

GPU_SBATCH = "slurm/train_gpu.sbatch"


def check_allocation(cfg: RunConfig, nodes: int, gpus_per_node: int, environ: Mapping[str, str] = os.environ) -> None:
    """Raise ConfigError listing every reason ``cfg`` cannot run on ``nodes`` x ``gpus_per_node`` GPUs."""
    problems: List[str] = []
    if nodes < 1:
        problems.append(f"--nodes {nodes} must be at least 1")
    if gpus_per_node < 1:
        problems.append(f"--gpus-per-node {gpus_per_node} must be at least 1")
    slurm_nodes = environ.get("SLURM_JOB_NUM_NODES")
    if slurm_nodes and slurm_nodes.isdigit() and int(slurm_nodes) != nodes:
        problems.append(
            f"--nodes {nodes} disagrees with the SLURM allocation this runs in (SLURM_JOB_NUM_NODES="
            f"{slurm_nodes}): plan for the nodes the job has, or submit a job with --nodes={nodes}"
        )
    slurm_gpus = environ.get("SLURM_GPUS_ON_NODE")
    if slurm_gpus and slurm_gpus.isdigit() and int(slurm_gpus) != gpus_per_node:
        problems.append(
            f"--gpus-per-node {gpus_per_node} disagrees with the SLURM allocation this runs in "
            f"(SLURM_GPUS_ON_NODE={slurm_gpus})"
        )
    if problems:
        raise ConfigError(problems)
    try:
        # The GPU nodes, not this one; their data checks too where the files are here.
        check_run(cfg, nodes * gpus_per_node, cuda=True, te_installed=True, check_data=not data_elsewhere(cfg))
    except ConfigError as err:
        raise ConfigError(
            [f"on {nodes} node(s) x {gpus_per_node} GPU(s) = {nodes * gpus_per_node} ranks: {p}" for p in err.problems]
        ) from None


def data_elsewhere(cfg: RunConfig) -> bool:
    """Whether the run's indexed data (or its tokenizer) is not on this machine: a plan made away from
    the cluster's file system checks the layout and leaves the data to the job's own start."""
    from megatron_ext.data.indexed import paths

    d = cfg.data
    if d.kind != "indexed":
        return False
    missing = [p for p in (*d.paths, *d.valid_paths) if not paths(p)["idx"].is_file()]
    tokenizer_missing = d.tokenizer not in (None, "bytes") and not Path(d.tokenizer).exists()
    return bool(missing) or tokenizer_missing


@dataclass
class LaunchPlan:
    """Everything the planner found for one config on one allocation."""

    cfg: RunConfig
    layout: Layout
    memory: List[StageMemory]
    """Per pipeline stage, the estimate of the run stage (``stages:``) that needs the most memory."""
    peak_run_stage: Optional[str]
    """That run stage where the run has several (``name (seq_length L)``), else None."""
    warnings: List[str]
    total_params: int
    gpu_memory_gib: float
    peak_by_recompute: Dict[str, float]
    """Peak per-GPU bytes with each train.recompute setting (to compare the choices)."""


def make_plan(
    cfg: RunConfig,
    nodes: int,
    gpus_per_node: int,
    inventory: ParamInventory,
    *,
    gpu_memory_gib: float = 80.0,
    environ: Mapping[str, str] = os.environ,
) -> LaunchPlan:
    """Check the allocation, then lay out the ranks and estimate memory (raises ConfigError)."""
    check_allocation(cfg, nodes, gpus_per_node, environ)
    layout = Layout.from_config(cfg, nodes, gpus_per_node)
    memory, peak_run_stage = _memory_over_run_stages(cfg, inventory, layout.world)
    warnings = []
    if data_elsewhere(cfg):
        warnings.append(
            f"the data ({', '.join(cfg.data.paths)}; tokenizer {cfg.data.tokenizer}) is not on this machine: "
            "its checks run when the job starts"
        )
    for kind in INTRA_NODE_KINDS if routed_experts(cfg) else ("tp",):
        warnings += [
            warning + (_expert_fix(cfg, layout, kind) if kind in ("ep", "etp") else "")
            for warning in layout.node_warnings([kind])
        ]
    for stage in memory:
        if stage.total > 0.9 * gpu_memory_gib * GIB:
            warnings.append(
                f"pipeline stage {stage.stage} needs about {stage.total / GIB:.1f} GiB per GPU, more than 90% "
                f"of {gpu_memory_gib:g} GiB: raise TP / PP, lower train.micro_batch_size or set "
                "train.recompute to selective / full"
            )
    peaks = {
        mode: max(s.total for s in _memory_over_run_stages(cfg, inventory, layout.world, mode)[0])
        for mode in ("none", "selective", "full")
    }
    return LaunchPlan(
        cfg=cfg,
        layout=layout,
        memory=memory,
        peak_run_stage=peak_run_stage,
        warnings=warnings,
        total_params=inventory.total,
        gpu_memory_gib=gpu_memory_gib,
        peak_by_recompute=peaks,
    )


def _memory_over_run_stages(
    cfg: RunConfig, inventory: ParamInventory, world: int, recompute: Optional[str] = None
) -> Tuple[List[StageMemory], Optional[str]]:
    """Per pipeline stage, the largest estimate over the run's stages (their sequence lengths and batches
    differ; the weights and optimizer do not), and the run stage of the overall peak (None: one stage).
    ``recompute``: estimate with that ``train.recompute`` instead of each stage's."""
    from megatron_ext.run.schedule import stage_configs

    configs = stage_configs(cfg)
    if recompute is not None:
        configs = [replace(c, train=replace(c.train, recompute=recompute)) for c in configs]
    estimates = [estimate_memory(c, inventory, world, cuda=True) for c in configs]
    memory = [max(column, key=lambda s: s.total) for column in zip(*estimates)]
    if len(configs) == 1:
        return memory, None
    peak = max(range(len(configs)), key=lambda i: max(s.total for s in estimates[i]))
    name = cfg.stages[peak].name or f"stage{peak}"
    return memory, f"stages[{peak}] {name} (seq_length {configs[peak].data.seq_length})"


def _expert_fix(cfg: RunConfig, lay: Layout, kind: str) -> str:
    """Why the EP or ETP groups of ``lay`` cross nodes and which ``parallel`` fields bring them inside one.

    An expert-layer rank is ``etp + ETP * (ep + EP * ...)``: an EP group takes every ETP-th rank of a
    block of ETP x EP consecutive ranks, an ETP group a block of ETP, so both stay on one node only
    when ETP x EP divides the GPUs per node. ETP follows ``parallel.tensor`` while
    ``parallel.expert_tensor`` is unset, which stretches the EP groups of a TP > 1 model. Each fix
    named is checked: the sizes fit the world, the experts divide evenly, no EP / ETP group crosses.
    """
    p = cfg.parallel

    def fits(etp: int, ep: int) -> bool:
        if routed_experts(cfg) % ep:
            return False
        try:
            candidate = replace(lay, etp=etp, ep=ep)
        except ValueError:  # the sizes do not fit the world
            return False
        return not candidate.cross_node_groups("ep") and not candidate.cross_node_groups("etp")

    def smaller_ep(etp: int) -> Optional[int]:
        return next((ep for ep in range(lay.ep - 1, 0, -1) if fits(etp, ep)), None)

    fixes = []
    if lay.etp > 1 and fits(1, lay.ep):
        fixes.append(f"parallel.expert_tensor=1 (ETP x EP = {lay.ep} ranks)")
    ep = smaller_ep(lay.etp)
    if ep is not None:
        fixes.append(f"parallel.expert={ep} (ETP x EP = {lay.etp * ep} ranks)")
    unsharded_ep = smaller_ep(1) if lay.etp > 1 and not fits(1, lay.ep) else None
    if unsharded_ep is not None and (ep is None or unsharded_ep > ep):
        fixes.append(f"parallel.expert_tensor=1 with parallel.expert={unsharded_ep} (ETP x EP = {unsharded_ep} ranks)")
    block = (
        f"each EP group spans ETP x EP = {lay.etp} x {lay.ep} = {lay.etp * lay.ep} consecutive ranks"
        if kind == "ep"
        else f"each ETP group spans ETP = {lay.etp} consecutive ranks"
    )
    if p.expert_tensor is None and lay.etp > 1:
        block += f" (parallel.expert_tensor is unset, so ETP follows parallel.tensor={p.tensor})"
    if not fixes:
        return (
            f"; {block}, and no smaller parallel.expert or parallel.expert_tensor fits into one node of "
            f"{lay.gpus_per_node} GPUs with these sizes: use nodes with more GPUs"
        )
    return f"; {block}: set " + ", or ".join(fixes) + f" to keep them inside a node of {lay.gpus_per_node} GPUs"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _wrap_groups(groups: List[List[int]], indent: str) -> str:
    text = " ".join("[" + ",".join(map(str, g)) + "]" for g in groups)
    return textwrap.fill(text, width=100, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


def _size_lines(plan: LaunchPlan) -> List[str]:
    """The allocation, the parallel sizes with the derived DP / EDP, and the batch split."""
    cfg, lay = plan.cfg, plan.layout
    p, t = cfg.parallel, cfg.train
    out = [
        f"{cfg.name}: {lay.nodes} node(s) x {lay.gpus_per_node} GPU(s) = {lay.world} ranks, "
        f"{_count(plan.total_params)} parameters",
        f"  dense layers:  TP {lay.tp} x CP {lay.cp} x DP {lay.dp} x PP {lay.pp}"
        + (f" (virtual pipeline {p.virtual_pipeline})" if p.virtual_pipeline else "")
        + (", sequence parallel" if p.sequence_parallel and lay.tp > 1 else ""),
    ]
    experts = routed_experts(cfg)
    if experts:
        out.append(
            f"  expert layers: ETP {lay.etp} x EP {lay.ep} x EDP {lay.edp} x PP {lay.pp} "
            f"({experts} experts, {experts // lay.ep} per EP rank)"
        )
    num_micro = t.global_batch_size // (t.micro_batch_size * lay.dp)
    out.append(
        f"  batch: global {t.global_batch_size} = micro-batch {t.micro_batch_size} x DP {lay.dp} x "
        f"{num_micro} micro-batches per step, {cfg.data.seq_length} tokens per sample"
    )
    return out


def _group_kinds(plan: LaunchPlan) -> List[Tuple[str, str, List[List[int]]]]:
    """``(title, line, groups)`` for each group kind worth showing: TP, DP and PP always, the others
    where their groups hold more than one rank (DP x CP only with CP > 1, expert kinds only with
    routed experts). ``line`` gives the count, the size and whether the groups cross nodes."""
    cfg, lay = plan.cfg, plan.layout
    kinds = [("tp", "TP"), ("cp", "CP"), ("dp", "DP"), ("dp-cp", "DP x CP (gradient reduction)"), ("pp", "PP")]
    if routed_experts(cfg):
        kinds += [("ep", "EP (token all-to-all)"), ("etp", "ETP"), ("edp", "EDP (expert gradient reduction)")]
    rows = []
    for kind, title in kinds:
        groups = lay.groups(kind)
        if kind == "dp-cp" and lay.cp == 1:
            continue
        if len(groups[0]) == 1 and kind not in ("tp", "dp", "pp"):
            continue
        crossing = len(lay.cross_node_groups(kind))
        where = f"{crossing} cross nodes" if crossing else "all inside a node"
        rows.append((title, f"  {title}: {len(groups)} group(s) of {len(groups[0])}, {where}", groups))
    return rows


def _memory_lines(plan: LaunchPlan, stages: Sequence[StageMemory]) -> List[str]:
    """The memory estimate: a title, one row per stage of ``stages``, the peak and its recompute choices."""
    cfg, lay = plan.cfg, plan.layout
    weight_bytes, _, _ = bytes_per_parameter(cfg, cuda=True)
    peak = max(plan.memory, key=lambda s: s.total)
    unit, scale = ("GiB", GIB) if peak.total >= 0.5 * GIB else ("MiB", 1024**2)
    out = [
        f"Memory per GPU, estimate ({unit}; {'bf16' if weight_bytes == 2 else 'fp32'} weights, fp32 "
        f"grads, Adam{' sharded over DP (distributed optimizer)' if lay.dp > 1 else ''}, "
        f"recompute={cfg.train.recompute}; formulas in megatron_ext/launch/memory.py)",
        "  stage  params/GPU  weights    grads  optimizer  activations    total",
    ]
    for s in stages:
        out.append(
            f"  {s.stage:>5}  {_count(s.params):>10}  {s.weights / scale:>7.2f}  {s.gradients / scale:>7.2f}  "
            f"{s.optimizer / scale:>9.2f}  {s.activations / scale:>11.2f}  {s.total / scale:>7.2f}"
        )
    where = f" in the run's {plan.peak_run_stage}" if plan.peak_run_stage else ""
    out.append(
        f"  peak: stage {peak.stage}{where}, {peak.total / GIB:.2f} GiB of {plan.gpu_memory_gib:g} GiB; "
        "with train.recompute = "
        + ", ".join(f"{mode}: {total / GIB:.2f}" for mode, total in plan.peak_by_recompute.items())
    )
    return out


def _warning_lines(plan: LaunchPlan) -> List[str]:
    return ["Warnings" if plan.warnings else "Warnings: none"] + [f"  - {w}" for w in plan.warnings]


def format_plan(plan: LaunchPlan) -> str:
    """The human-readable report printed by ``python -m pretrain.plan``: sizes, every rank's
    coordinates, every group's ranks, the memory of every stage, the warnings."""
    lay, experts = plan.layout, routed_experts(plan.cfg) is not None
    out = _size_lines(plan)
    out += [
        "",
        "Ranks (Megatron order tp-cp-ep-dp-pp; node = rank // GPUs per node)",
        "  rank  node |  TP  CP  DP  PP" + (" |  EP ETP EDP" if experts else ""),
    ]
    for c in lay.coordinates():
        line = f"  {c.rank:>4}  {c.node:>4} | {c.tp:>3} {c.cp:>3} {c.dp:>3} {c.pp:>3}"
        out.append(line + (f" | {c.ep:>3} {c.etp:>3} {c.edp:>3}" if experts else ""))
    out += ["", "Groups (ranks that share each group)"]
    for _, line, groups in _group_kinds(plan):
        out += [line, _wrap_groups(groups, "    ")]
    out += ["", *_memory_lines(plan, plan.memory), "", *_warning_lines(plan)]
    return "\n".join(out)


def format_plan_summary(plan: LaunchPlan) -> str:
    """The report of :func:`format_plan` without the per-rank and per-group listings, whose length
    grows with the GPU count: sizes, one line per group kind, the peak stage's memory, the warnings
    (``python -m pretrain.plan --summary``)."""
    peak = max(plan.memory, key=lambda s: s.total)
    out = _size_lines(plan)
    out += ["", f"Groups (node = rank // {plan.layout.gpus_per_node}; the ranks of each: run without --summary)"]
    out += [line for _, line, _ in _group_kinds(plan)]
    out += ["", *_memory_lines(plan, [peak]), "", *_warning_lines(plan)]
    return "\n".join(out)


def sbatch_command(
    config: str,
    overrides: Sequence[str],
    nodes: int,
    gpus_per_node: int,
    job_name: Optional[str] = None,
    script: str = GPU_SBATCH,
) -> str:
    """The submission command for this allocation (run from the repository root).

    ``NODES`` tells the script how many nodes the plan was made for; it refuses to start on an
    allocation of another size.
    """
    train_args = ["--config", config] + [item for o in overrides for item in ("--set", o)]
    sbatch = ["sbatch", f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}"]
    if job_name:
        sbatch.append(f"--job-name={job_name}")
    sbatch += [f"--export=ALL,NODES={nodes}", script, *train_args]
    return "mkdir -p logs && " + " ".join(shlex.quote(a) for a in sbatch)
