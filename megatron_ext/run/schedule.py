"""The run's schedule: the global batch of every step (batch-size ramp-up), the stages and the data
position, computed from the config alone so that a resumed run finds the same numbers at any step.

Ramp-up (``train.rampup_batch_size: [start, increment, samples]``, Megatron-LM's
``--rampup-batch-size``): the global batch of a step is Megatron-Core's
``RampupBatchsizeNumMicroBatchesCalculator`` evaluated at the samples consumed before the step, as
Megatron-LM's training loop calls ``update_num_microbatches(consumed_train_samples)`` before each
step: ``start + floor(consumed / (samples / n)) * increment`` with ``n = (global_batch_size - start) /
increment`` increments, ``global_batch_size`` once ``consumed > samples``.

Stages (``stages:``): stage ``i`` runs steps ``first_step .. last_step`` with the run config of the
previous stage plus its overrides. A stage that sets ``train.global_batch_size`` trains at that batch
(no ramp-up from there on; e.g. fewer, longer sequences at a longer context); the others follow the
run's ramp-up or batch. Its LR schedule spans its own length; the unit of every LR
schedule is the optimizer step, or the sample with a ramp-up (Megatron-LM's sample-based schedule: the
scheduler advances by each step's global batch, so that it counts the samples, and with them the
tokens, that were really trained; a stage's ``warmup_steps`` and ``wsd_decay_steps`` become the
samples of its first and last that many steps).

Data position: every stage reads the training samples of its own data section. A stage continues
the sample stream of the earlier stages that read the same data (the same blend, split and seed,
whatever their sequence length) from their token count: it starts at sample
``tokens already trained on that data // its sequence length``. With an unchanged sequence length that
is exactly where the previous stage stopped; at a longer one the new samples start after the tokens
already read (in the order of Megatron's sample index of the new length, a shuffle: the position is
the share of the data gone through, not the same documents); new data starts at its first sample.
"""

from __future__ import annotations

import dataclasses
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from megatron_ext.config import ConfigError, apply_overrides, from_dict, to_dict

if TYPE_CHECKING:
    from megatron_ext.run.config import RunConfig


@dataclass(frozen=True)
class Stage:
    """One stage of the run as scheduled (a run without ``stages:`` is one stage)."""

    index: int
    name: str
    config: Any
    """The stage's run config (the run's plus every override up to this stage; ``stages`` empty,
    ``train.steps`` the whole run's)."""
    first_step: int
    """Its first step (1-based)."""
    last_step: int
    """Its last step."""
    data_start: int
    """The sample of its training dataset that its first step starts at."""
    start_samples: int
    """Samples the run consumed before the stage."""

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1


def _data_identity(data) -> Tuple:
    """What decides a data section's sample stream apart from the sequence length."""
    return (data.kind, tuple(data.paths), tuple(data.weights or ()), data.paths_split, data.seed, data.tokenizer)


def _merged(raw: Dict[str, Any], overrides) -> Dict[str, Any]:
    """``raw`` (a run config as nested dicts) with a stage's section overrides on top. A stage that sets
    its own ``train.global_batch_size`` trains at that batch throughout: it has no ramp-up."""
    merged = {name: dict(value) if isinstance(value, dict) else value for name, value in raw.items()}
    for section, values in overrides.overrides().items():
        merged[section].update(values)
    if "global_batch_size" in overrides.train:
        merged["train"]["rampup_batch_size"] = None
    return merged


def stage_configs(cfg: RunConfig) -> List[Any]:
    """Each stage's run config (the run's own alone without ``stages``); ConfigError naming the stage
    (``stages[i].section.field``) for an override the sections refuse."""
    if not cfg.stages:
        return [cfg]
    raw = to_dict(cfg)
    raw["stages"] = []
    configs, problems = [], []
    for i, stage in enumerate(cfg.stages):
        raw = _merged(raw, stage)
        try:
            configs.append(from_dict(type(cfg), raw))
        except ConfigError as err:
            problems.extend(err.under(f"stages[{i}]").problems)
            configs.append(None)
    if problems:
        raise ConfigError(problems)
    return configs


def _structure_problems(cfg: RunConfig, configs: List[Any]) -> List[str]:
    """What a stage changes that the model the run built cannot follow."""
    problems = []
    base = cfg.model
    for i, stage_cfg in enumerate(configs):
        m, d = stage_cfg.model, stage_cfg.data
        if base.position_embedding == "learned_absolute":
            before = base.max_position_embeddings or cfg.data.seq_length
            after = m.max_position_embeddings or d.seq_length
            if after != before:
                problems.append(
                    f"stages[{i}]: learned absolute position embeddings have {before} rows, the stage would need "
                    f"{after} (data.seq_length={d.seq_length}, model.max_position_embeddings="
                    f"{m.max_position_embeddings}): keep the length, or use model.position_embedding: rope"
                )
        if base.position_embedding == "rope" and d.reset_position_ids != cfg.data.reset_position_ids:
            problems.append(
                f"stages[{i}].data.reset_position_ids={d.reset_position_ids}: the model's RoPE reads per-document "
                "positions only if the run's data section asks for them when the model is built; set "
                "data.reset_position_ids the same for the run and every stage"
            )
        if (base.rope_scaling.type == "yarn" or m.rope_scaling.type == "yarn") and m.rope_scaling != base.rope_scaling:
            problems.append(
                f"stages[{i}].model.rope_scaling: YaRN's parameters live in the model's transformer config and "
                "rotary class, built once per run; give the run's own model.rope_scaling the YaRN settings, or "
                "extend the context with linear or llama3 scaling or model.rotary_base"
            )
    return problems


class RunSchedule:
    """The global batch, stage and data position of every step of ``cfg`` on ``data_parallel`` ranks.

    Raises ConfigError for stage lengths that do not add up to ``train.steps`` or an LR schedule
    that does not fit its stage; the batch sizes themselves are checked by :func:`schedule_problems`.
    """

    def __init__(self, cfg: RunConfig, data_parallel: int):
        from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

        t = cfg.train
        self.cfg = cfg
        self.ramp = t.rampup_batch_size is not None
        calculator = None
        if self.ramp:
            start, increment, samples = t.rampup_batch_size
            # rank 1: Megatron's calculator logs on rank 0 only; the loop logs the batch itself.
            calculator = RampupBatchsizeNumMicroBatchesCalculator(
                t.global_batch_size, t.micro_batch_size, data_parallel, False, 1, start, increment, samples
            )
        configs = stage_configs(cfg)
        problems = _structure_problems(cfg, configs)
        if problems:
            raise ConfigError(problems)
        # Machine integers: a paper-scale run has ~1e6 steps.
        self.batches = array("q")  # the global batch of step k at [k - 1]
        self.samples = array("q", [0])  # samples consumed after k steps at [k]
        self.tokens = array("q", [0])
        self.stages: List[Stage] = []
        trained: Dict[Tuple, int] = {}  # tokens trained per data identity
        lengths = cfg.stages or [None]
        for i, (stage_cfg, spec) in enumerate(zip(configs, lengths)):
            seq, identity = stage_cfg.data.seq_length, _data_identity(stage_cfg.data)
            first = len(self.batches) + 1
            start_samples, start_tokens = self.samples[-1], self.tokens[-1]
            last_stage = i == len(lengths) - 1
            while True:
                done = len(self.batches) - first + 1
                if spec is None or (spec.steps is None and spec.tokens is None):
                    if len(self.batches) >= t.steps:
                        break
                elif spec.steps is not None and done >= spec.steps:
                    break
                elif spec.tokens is not None and self.tokens[-1] - start_tokens >= spec.tokens:
                    break
                if len(self.batches) >= t.steps and not last_stage:
                    break
                if calculator is not None and stage_cfg.train.rampup_batch_size is not None:
                    calculator.update(self.samples[-1], consistency_check=True)
                    batch = calculator.get_current_global_batch_size()
                else:  # the stage's own batch (the run's without stages)
                    batch = stage_cfg.train.global_batch_size
                self.batches.append(batch)
                self.samples.append(self.samples[-1] + batch)
                self.tokens.append(self.tokens[-1] + batch * seq)
            name = (spec.name if spec is not None else None) or (f"stage{i}" if cfg.stages else cfg.name)
            self.stages.append(
                Stage(
                    index=i,
                    name=name,
                    config=stage_cfg,
                    first_step=first,
                    last_step=len(self.batches),
                    data_start=trained.get(identity, 0) // seq,
                    start_samples=start_samples,
                )
            )
            trained[identity] = trained.get(identity, 0) + self.tokens[-1] - start_tokens
        self.last_steps = [s.last_step for s in self.stages]  # what stage_of bisects
        self.batch_varies = len(self.batches) > 0 and min(self.batches) != max(self.batches)
        """Whether the global batch changes during the run (a ramp-up, a stage's own batch)."""
        problems = self._length_problems() + [p for s in self.stages for p in self._lr_problems(s)]
        if problems:
            raise ConfigError(problems)

    def _length_problems(self) -> List[str]:
        cfg, total = self.cfg, len(self.batches)
        if not cfg.stages:
            return []
        problems = [
            f"stages[{s.index}] ({s.name}) has no step: train.steps={cfg.train.steps} ends the run before it "
            f"(the stages before it take {s.first_step - 1} steps)"
            for s in self.stages
            if s.steps <= 0
        ]
        if total != cfg.train.steps:
            problems.append(
                f"the stages take {total} steps but train.steps={cfg.train.steps}: set train.steps to {total}, "
                "or leave the last stage's length out (it then runs to train.steps)"
            )
        return problems

    def _lr_problems(self, stage: Stage) -> List[str]:
        t = stage.config.train
        where = f"stages[{stage.index}].train" if self.cfg.stages else "train"
        if stage.steps <= 0:
            return []
        problems = []
        if t.warmup_steps and t.warmup_steps >= stage.steps:
            problems.append(
                f"{where}.warmup_steps={t.warmup_steps} must be below the stage's {stage.steps} steps "
                "(its schedule needs a step after warmup)"
            )
        if t.lr_schedule == "wsd" and t.wsd_decay_steps and t.wsd_decay_steps > stage.steps - t.warmup_steps:
            problems.append(
                f"{where}.wsd_decay_steps={t.wsd_decay_steps} exceeds the stage's steps after warmup "
                f"({stage.steps - t.warmup_steps})"
            )
        return problems if self.cfg.stages else []

    # Per step (1-based; step 0 is the start of the run).

    @property
    def total_steps(self) -> int:
        return len(self.batches)

    def global_batch(self, step: int) -> int:
        """Samples of step ``step``."""
        return self.batches[step - 1]

    def consumed_samples(self, step: int) -> int:
        """Samples consumed after ``step`` steps."""
        return self.samples[step]

    def consumed_tokens(self, step: int) -> int:
        """Tokens consumed after ``step`` steps."""
        return self.tokens[step]

    def stage_of(self, step: int) -> Stage:
        """The stage that step ``step`` belongs to (step 0: the first)."""
        return self.stages[min(bisect_left(self.last_steps, max(step, 1)), len(self.stages) - 1)]

    def data_position(self, step: int) -> int:
        """The sample of its stage's training dataset that step ``step`` starts at."""
        stage = self.stage_of(step)
        return stage.data_start + self.samples[step - 1] - stage.start_samples

    def stage_samples(self, stage: Stage) -> int:
        """Training samples the stage's dataset must hold: its start position and every sample it trains."""
        return stage.data_start + self.samples[stage.last_step] - stage.start_samples

    # The LR schedule of a stage, in its units (steps, or samples with a ramp-up).

    def lr_increment(self, step: int) -> int:
        """How far step ``step`` advances its stage's LR schedule."""
        return self.batches[step - 1] if self.ramp else 1

    def lr_lengths(self, stage: Stage) -> Tuple[int, int, Optional[int]]:
        """``(decay, warmup, wsd_decay)`` lengths of the stage's LR schedule in its units: the whole
        stage, its first ``warmup_steps`` steps, its last ``wsd_decay_steps`` steps."""
        t = stage.config.train

        def units(first: int, last: int) -> int:  # steps first .. last
            return self.samples[last] - self.samples[first - 1] if self.ramp else last - first + 1

        decay = units(stage.first_step, stage.last_step)
        warmup = units(stage.first_step, stage.first_step + t.warmup_steps - 1) if t.warmup_steps else 0
        wsd = None
        if t.wsd_decay_steps is not None:
            wsd = units(stage.last_step - t.wsd_decay_steps + 1, stage.last_step)
        return decay, warmup, wsd


def _check_problems(cfg: RunConfig, world_size: int, check_kwargs: Dict[str, Any]) -> List[str]:
    """The problems :func:`~megatron_ext.run.checks.check_run` finds in ``cfg`` (a config without stages)."""
    from megatron_ext.run.checks import check_run

    try:
        check_run(cfg, world_size, **check_kwargs)
    except ConfigError as err:
        return list(err.problems)
    return []


def schedule_problems(cfg: RunConfig, world_size: int, data_parallel: int, **check_kwargs) -> List[str]:
    """The problems of the ramp-up and the stages of ``cfg`` on ``world_size`` ranks with ``data_parallel``
    data-parallel ranks (0: the layout does not fit, reported elsewhere): the batch sizes of the ramp,
    stage overrides that the built model cannot follow, stage lengths, each stage's LR schedule, and
    what :func:`~megatron_ext.run.checks.check_run` (``check_kwargs``) finds in a stage's config but not
    in the run's."""
    t = cfg.train
    problems: List[str] = []
    if t.rampup_batch_size is not None and data_parallel:
        start, increment, _ = t.rampup_batch_size
        per_step = t.micro_batch_size * data_parallel
        for name, value in (("start", start), ("increment", increment)):
            if value % per_step:
                problems.append(
                    f"train.rampup_batch_size={t.rampup_batch_size}: {name}={value} is not divisible by "
                    f"train.micro_batch_size x data-parallel size = {t.micro_batch_size}*{data_parallel}: every "
                    "global batch of the ramp must be whole micro-batches on every rank"
                )
    if problems or not data_parallel:
        return problems
    try:
        schedule = RunSchedule(cfg, data_parallel)
    except ConfigError as err:
        return list(err.problems)
    if cfg.stages:
        known = set(_check_problems(dataclasses.replace(cfg, stages=[]), world_size, check_kwargs))
        for stage in schedule.stages:
            problems.extend(
                f"stages[{stage.index}] ({stage.name}): {p}"
                for p in _check_problems(stage.config, world_size, check_kwargs)
                if p not in known
            )
    return problems


def trained_config(run_dir, step: Optional[int] = None, overrides=()) -> RunConfig:
    """The run config a checkpoint of ``run_dir`` was trained with, for the tools that load one
    (evaluation, generation, export, extraction): ``config.yaml``, and for a run with ``stages:`` the
    config of the stage that trained checkpoint ``step`` (default: the latest; no checkpoint: the last
    stage), so that its model is built with the RoPE base and scaling and the sequence length that
    stage trained at. ``overrides`` (``section.key=value``) apply on top of the stage's settings."""
    from pathlib import Path

    from megatron_ext.run.checks import checkpoint_dir
    from megatron_ext.run.config import load_config

    cfg = load_config(Path(run_dir) / "config.yaml")
    if cfg.stages:
        if step is None:
            latest = checkpoint_dir(run_dir)
            step = int(latest.name.split("_")[-1]) if latest is not None else cfg.train.steps
        cfg = RunSchedule(cfg, data_parallel=1).stage_of(step).config
    return from_dict(type(cfg), apply_overrides(to_dict(cfg), list(overrides))) if overrides else cfg
