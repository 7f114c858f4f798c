"""The training loop: build, (resume), step, log, evaluate, checkpoint, stop cleanly.

What the enabled capabilities add enters only through their callbacks and batch hooks
(:mod:`megatron_ext.training.capabilities`); the loop names no method.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_ext.capability import Callback, TrainContext
from megatron_ext.compat import enable_cpu_support
from megatron_ext.config import ConfigError
from megatron_ext.models.flops import ModelCost
from megatron_ext.models.vocab import padded_vocab_size
from megatron_ext.optim import build_optimizer
from megatron_ext.parallel import ParallelSizes, destroy_parallel_state, initialize_parallel_state
from megatron_ext.parallel.state import comm_device, init_distributed, process_groups
from megatron_ext.run import RunConfig, check_run, data_parallel_size
from megatron_ext.run.builder import build_model, params_dtype
from megatron_ext.run.checks import checkpoint_dir
from megatron_ext.run.datasets import build_datasets
from megatron_ext.run.hf import is_hf_dir
from megatron_ext.run.schedule import RunSchedule, Stage
from megatron_ext.training.capabilities import capability_callbacks, checked_metrics
from megatron_ext.training.checkpoint import CheckpointManager, CommonState, check_steps_reach, load_model_weights
from megatron_ext.training.ddp import release_ddp, wrap_with_ddp
from megatron_ext.training.hf import convert_for_init
from megatron_ext.training.observability import Observability
from megatron_ext.training.preflight import check_init_from
from megatron_ext.training.run_report import plot_loss_curve, run_summary
from megatron_ext.training.rundir import RunDirectory
from megatron_ext.training.runlock import lock_run_directory
from megatron_ext.training.signals import StopRequest
from megatron_ext.training.stages import set_rotary
from megatron_ext.training.step import StepResult, eval_step, global_batch_iterator, run_forward_step, train_step
from megatron_ext.training.throughput import PeakFlops, peak_flops_per_rank
from megatron_ext.training.watchdog import StepWatchdog


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class TrainSummary:
    """What a finished (or stopped) run reports."""

    final_step: int
    stopped_by_signal: bool
    losses: List[float] = field(default_factory=list)
    skipped_steps: int = 0


def _scheduler(cfg: RunConfig, optimizer, lengths: Tuple[int, int, Optional[int]]):
    """Megatron's LR scheduler of a stage of the run (``cfg`` its config), ``lengths`` its decay, warmup
    and WSD decay lengths in the schedule's units (:meth:`RunSchedule.lr_lengths`)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    decay, warmup, wsd = lengths
    style = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}[t.lr_schedule]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        wsd_decay_steps=wsd,
        lr_wsd_decay_style=t.wsd_decay_style,
        # The config is the source of truth on resume (e.g. train.steps extended): only the
        # step count comes from the checkpoint.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def optimizer_config(cfg: RunConfig, cuda: bool):
    """Megatron's ``OptimizerConfig`` of a run: AdamW from ``train``; on GPU with data parallelism
    Megatron's distributed optimizer (state sharded over DP ranks, ZeRO-1)."""
    from megatron.core.optimizer import OptimizerConfig

    t = cfg.train
    bf16 = params_dtype(cfg, cuda) == torch.bfloat16
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cuda and data_parallel_size(cfg, dist.get_world_size()) > 1,
    )


def peak_memory_gib(cuda: bool) -> float:
    """Largest peak memory of any rank so far, GiB: the CUDA caching allocator's peak allocation on
    GPU, the process's peak resident set on CPU. A MAX all-reduce over the world."""
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    value = torch.tensor([peak], dtype=torch.float64, device=comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


class Trainer:
    """One training run in one run directory. Use :meth:`run`; it resumes when it can."""

    def __init__(self, cfg: RunConfig, run_dir: Path, callbacks: Sequence[Callback] = (), log: Callable = print):
        self.cfg = cfg
        self.run_dir_path = Path(run_dir)
        if cfg.train.eval_tasks.tasks and not any(cb.name == "eval_tasks" for cb in callbacks):
            raise ConfigError(
                [
                    "train.eval_tasks runs through the evaluation callback: train with python -m pretrain.train, "
                    "or pass megatron_ext.evaluation.during_training.EvalTasksCallback(cfg) in callbacks"
                ]
            )
        self.callbacks = list(capability_callbacks(cfg, log).values()) + list(callbacks)
        self.log = log

    def run(self, *, checked: bool = False) -> TrainSummary:
        """Set up the process groups and parallel state, train, and tear them down however it ends.

        ``checked``: the caller has already run :func:`check_run` on this rank for this job's world
        size (the training entry point does, before the rendezvous); otherwise it runs here.
        """
        cfg = self.cfg
        cuda = torch.cuda.is_available()
        enable_cpu_support()
        if not checked:
            world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
            check_run(cfg, world_size, cuda=cuda)  # before any process group exists
        init_distributed(cuda, cfg.train.distributed_timeout_minutes)
        check_init_from(cfg, self.run_dir_path)  # a damaged or crafted train.init_from: refused before any write
        lock = lock_run_directory(self.run_dir_path, self.log)  # one job per run directory, before any write
        p = cfg.parallel
        initialize_parallel_state(
            ParallelSizes(
                tp=p.tensor, pp=p.pipeline, cp=p.context, ep=p.expert, etp=p.expert_tensor, vpp=p.virtual_pipeline
            ),
            seed=cfg.train.seed,
            timeout_minutes=cfg.train.distributed_timeout_minutes,
        )
        try:
            # Nothing but the summary outlives the run object: the teardown's garbage collection frees
            # its model and with it the process groups the model holds.
            return _TrainingRun(cfg, self.run_dir_path, self.callbacks, self.log, cuda).train()
        finally:
            destroy_parallel_state()
            lock.release()


class _TrainingRun:
    """What one :meth:`Trainer.run` builds, and its phases: the build (here), :meth:`resume`,
    :meth:`prepare_steps`, then :meth:`loop`, one :meth:`step` at a time. Every method is called on
    every rank."""

    def __init__(self, cfg: RunConfig, run_dir: Path, callbacks: List[Callback], log: Callable, cuda: bool):
        self.cfg, self.callbacks, self.log, self.cuda = cfg, callbacks, log, cuda
        self.rank0 = dist.get_rank() == 0
        self.run_dir = RunDirectory(run_dir, is_writer=self.rank0)
        self.run_dir.write_config(cfg)
        dist.barrier()

        opt_config = optimizer_config(cfg, cuda)
        self.model = wrap_with_ddp(
            build_model(cfg, cuda=cuda),
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            use_distributed_optimizer=opt_config.use_distributed_optimizer,
        )
        self.optimizer = build_optimizer(opt_config, self.model)
        from megatron.core import parallel_state

        self.schedule = RunSchedule(cfg, parallel_state.get_data_parallel_world_size())
        self.checkpoints = CheckpointManager(
            self.run_dir.checkpoints, cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save
        )
        self.ctx = TrainContext(
            config=cfg,
            model=self.model,
            optimizer=self.optimizer,
            run_dir=self.run_dir.path,
            pg_collection=process_groups(),
        )
        self.train_data = None  # the current stage's, from prepare_steps on
        self.enter_stage(self.schedule.stage_of(0))
        self.summary = TrainSummary(final_step=0, stopped_by_signal=False)

    def train(self) -> TrainSummary:
        self.resume()
        self.prepare_steps()
        return self.loop()

    def log_rank0(self, line: str) -> None:
        if self.rank0:
            self.log(line)

    # Before the first step.

    def resume(self) -> None:
        """Continue from the newest checkpoint that verifies (with ``checkpoint.resume``), else start
        from the weights of ``train.init_from`` when set; then open the metrics at the step reached."""
        cfg = self.cfg
        latest = self.checkpoints.latest_verified(log=self.log_rank0) if cfg.checkpoint.resume else None
        if latest is not None:
            check_steps_reach(latest, cfg.train.steps)
            self.load_checkpoint(latest)
        elif cfg.train.init_from is not None:
            self.load_initial_weights(cfg.train.init_from)
        self.run_dir.start_metrics(self.ctx.step, cfg.logging.tensorboard, log=self.log_rank0)

    def load_checkpoint(self, path: Path) -> None:
        """The model of checkpoint ``path`` and the run's position in it (step, consumed samples,
        skipped steps, callback states); with ``checkpoint.load_optimizer`` also the optimizer and LR
        schedule."""
        load_optimizer = self.cfg.checkpoint.load_optimizer
        common = self.checkpoints.load(path, self.model, self.optimizer, load_optimizer)
        self.ctx.step, self.ctx.consumed_samples = common.step, common.consumed_samples
        expected = self.schedule.consumed_samples(min(common.step, self.schedule.total_steps))
        if common.consumed_samples != expected:
            raise ConfigError(
                [
                    f"{path.name} consumed {common.consumed_samples} samples in {common.step} steps, but this "
                    f"config's batch schedule gives {expected}: train.global_batch_size, "
                    "train.rampup_batch_size or the stages changed since it was written; restore them, or start "
                    "a new run directory from its weights (train.init_from)"
                ]
            )
        self.enter_stage(self.schedule.stage_of(common.step))  # the stage of its last step, whose LR schedule it saved
        self.summary.skipped_steps = common.skipped_steps
        if common.restored_optimizer:  # not from a checkpoint that starts a run (an import's): it has none
            self.scheduler.load_state_dict(common.scheduler)
        for cb in self.callbacks:
            cb.load_state_dict(common.callback_state(cb))
        self.log_rank0(
            f"resumed from {path} at step {self.ctx.step}"
            + ("" if common.restored_rng else " (new layout: RNG streams restarted)")
        )

    def load_initial_weights(self, init_from: str) -> None:
        """``train.init_from``: the weights alone, of a checkpoint of this project or of a HF model
        directory (converted once, into the run directory); training starts at step 0."""
        source = (
            convert_for_init(Path(init_from), self.run_dir.path, self.cfg)
            if is_hf_dir(init_from)
            else checkpoint_dir(init_from)
        )
        load_model_weights(source, self.model)
        self.log_rank0(f"initialized the model weights from {source}; starting at step 0")

    def prepare_steps(self) -> None:
        """The datasets, the forward step and the micro-batches of a global batch, the validation that
        callbacks may run (``ctx.evaluate``), and the peak FLOP/s that MFU is measured against."""
        from megatron.core import parallel_state

        cfg, t = self.cfg, self.cfg.train
        self.per_micro_step = t.micro_batch_size * parallel_state.get_data_parallel_world_size()
        self.device = comm_device()  # the model's: this rank's GPU under NCCL
        self.stage_data()
        self.peak = PeakFlops(
            *peak_flops_per_rank(
                self.cuda, params_dtype(cfg, self.cuda), cfg.logging.peak_tflops_per_rank, comm_device=self.device
            ),
            log=self.log_rank0,
        )
        self.log_rank0(f"mfu against {self.peak}")
        self.observer = Observability(
            cfg, self.run_dir.path, self.model, self.optimizer, self.device, self.cuda, self.log
        )
        self.vocab_rows = padded_vocab_size(cfg.model.vocab_size)

    def enter_stage(self, stage: Stage) -> None:
        """Make ``stage`` the current one: its LR schedule from its start (a resume then loads the
        saved position), its RoPE settings, and once the steps are prepared its data and forward step.
        The weights and the optimizer state carry on."""
        self.stage = stage
        if self.cfg.stages:  # Megatron's param groups carry the peak and final LR the scheduler reads
            for group in self.optimizer.param_groups:
                group.update(max_lr=stage.config.train.lr, min_lr=stage.config.train.min_lr)
        self.scheduler = _scheduler(stage.config, self.optimizer, self.schedule.lr_lengths(stage))
        self.ctx.config = stage.config
        if self.cfg.stages:
            set_rotary(self.model, stage.config.model)
        if self.train_data is not None:
            self.stage_data()

    def stage_data(self) -> None:
        """The current stage's datasets (sized for every sample it trains from its start position), forward
        step (its loss weights) and validation."""
        cfg = self.stage.config
        self.train_data, self.valid_data = build_datasets(cfg, self.schedule.stage_samples(self.stage))
        self.forward_step = run_forward_step(cfg, self.device)
        self.ctx.evaluate = self.validation_loss if self.valid_data is not None else None

    def change_stage(self, step: int) -> None:
        """Before step ``step``: move to its stage when it starts one."""
        stage = self.schedule.stage_of(step)
        if stage.index == self.stage.index:
            return
        self.enter_stage(stage)
        d, t = stage.config.data, stage.config.train
        methods = "".join(  # what the stage sets in the capabilities' sections
            f", {section}.{key} {value}"
            for section, values in self.cfg.stages[stage.index].overrides().items()
            if section not in ("train", "data", "model")
            for key, value in values.items()
        )
        self.log_rank0(
            f"stage {stage.index} ({stage.name}) begins at step {step}: steps {stage.first_step}-{stage.last_step}, "
            f"seq_length {d.seq_length}, batch {self.schedule.global_batch(step)}, lr {t.lr:g} -> {t.min_lr:g} "
            f"({t.lr_schedule}), rotary_base {stage.config.model.rotary_base}{methods}, data from sample "
            f"{self.schedule.data_position(step)} ({self.schedule.consumed_tokens(step - 1):,} tokens trained); "
            "weights and optimizer state kept"
        )

    def micro_batches(self, dataset, consumed_samples: int, global_batch_size: int):
        """This rank's micro-batches of the global batch of ``global_batch_size`` samples of ``dataset`` that
        starts at sample ``consumed_samples``."""
        return global_batch_iterator(
            dataset, consumed_samples, self.cfg, len(self.model), self.device, global_batch_size
        )

    def validation_loss(self) -> float:
        """Mean loss over the first ``train.eval_steps`` validation global batches (collective)."""
        self.watchdog.enter("evaluate", self.ctx.step)
        t = self.stage.config.train
        return (
            sum(
                eval_step(
                    self.model,
                    self.micro_batches(self.valid_data, i * t.global_batch_size, t.global_batch_size),
                    num_microbatches=t.global_batch_size // self.per_micro_step,
                    seq_length=self.stage.config.data.seq_length,
                    micro_batch_size=t.micro_batch_size,
                    forward_step_func=self.forward_step,
                )
                for i in range(t.eval_steps)
            )
            / t.eval_steps
        )

    # The loop.

    def loop(self) -> TrainSummary:
        """Train until ``train.steps``, or until the ranks agree on a stop signal; the signal handlers,
        metrics writers and DDP hooks are released however it ends."""
        cfg = self.cfg
        stop = StopRequest()
        stop.install()
        self.watchdog = StepWatchdog.for_run(cfg.train.hang_factor, cfg.train.hang_min_seconds)
        for cb in self.callbacks:
            cb.on_train_start(self.ctx)
        self.nonfinite_streak = 0
        self.interval_losses: List[float] = []  # finite losses since the last logged step
        self.start_step, self.start_time = self.ctx.step, time.perf_counter()
        try:
            while self.ctx.step < cfg.train.steps:
                self.change_stage(self.ctx.step + 1)
                if self.step(stop):
                    break
            else:
                if cfg.checkpoint.save_at_end:
                    self.save()
            self.finish_save(blocking=True)
            for cb in self.callbacks:
                cb.on_train_end(self.ctx)
        finally:
            stop.uninstall()
            self.watchdog.stop()
            self.observer.close(self.ctx.step)
            self.run_dir.close()
            release_ddp(self.model)
        self.summary.final_step = self.ctx.step
        if self.rank0:  # the run's closing lines: where things are, and the loss curve among the plots
            plot_loss_curve(self.run_dir.path)
            self.log(run_summary(self.run_dir.path, self.ctx.step, self.summary.stopped_by_signal))
        return self.summary

    def step(self, stop: StopRequest) -> bool:
        """One step: the update, its metrics, the periodic evaluation, logging and checkpoint. True
        when a stop signal ends the run after it (every rank asked: a collective)."""
        self.watchdog.enter("update", self.ctx.step + 1)  # the phases of the step (watchdog.PHASES)
        self.observer.begin_step(self.ctx.step + 1)
        result, step_time = self.update()
        self.track_losses(result)
        self.watchdog.enter("metrics", self.ctx.step)
        record = self.metrics(result, step_time)
        record.update(self.observer.end_step(self.ctx.step))
        self.watchdog.enter("log", self.ctx.step)
        self.evaluate_and_log(record)
        self.watchdog.enter("checkpoint", self.ctx.step)
        return self.checkpoint(stop.agreed())

    def update(self) -> Tuple[StepResult, float]:
        """Forward, backward and optimizer update on the next global batch; returns the step's result
        and its wall time."""
        t, step = self.cfg.train, self.ctx.step + 1
        batch = self.schedule.global_batch(step)  # the ramp-up's or the stage's at this step
        self.ctx.num_microbatches = batch // self.per_micro_step
        with self.observer.timed("callbacks"):
            for cb in self.callbacks:
                cb.on_step_begin(self.ctx)
        step_start = time.perf_counter()
        with self.observer.timed("data"):
            batches = self.micro_batches(self.train_data, self.schedule.data_position(step), batch)
        result = train_step(
            self.model,
            self.optimizer,
            batches,
            num_microbatches=self.ctx.num_microbatches,
            seq_length=self.stage.config.data.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_step_func=self.forward_step,
            opt_param_scheduler=self.scheduler,
            increment=self.schedule.lr_increment(step),
            timers=self.observer.timers,
        )
        self.observer.after_train_step()
        self.ctx.step = step
        self.ctx.consumed_samples += batch
        assert self.ctx.consumed_samples == self.schedule.consumed_samples(step)
        return result, time.perf_counter() - step_start

    def track_losses(self, result: StepResult) -> None:
        """Count a skipped update, and end the run after ``train.max_consecutive_nonfinite`` non-finite
        steps in a row; keep the loss for the summary and, when finite, for the logged interval mean."""
        t = self.cfg.train
        finite = result.update_successful and math.isfinite(result.loss)
        self.nonfinite_streak = 0 if finite else self.nonfinite_streak + 1
        self.summary.skipped_steps += 0 if result.update_successful else 1
        if self.nonfinite_streak >= t.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} consecutive steps (up to step {self.ctx.step}) had a non-finite loss or "
                f"gradient norm (loss {result.loss}, grad norm {result.grad_norm}); the updates "
                "were skipped. Lower train.lr, check the data, or resume from the last checkpoint."
            )
        self.summary.losses.append(result.loss)
        if finite:
            self.interval_losses.append(result.loss)

    def metrics(self, result: StepResult, step_time: float) -> Dict[str, float]:
        """The step's record: loss, LR, throughput and model FLOPs (the cost as the callbacks adjust
        it), then the callbacks' own metrics."""
        cfg, ctx = self.stage.config, self.ctx
        batch = self.schedule.global_batch(ctx.step)
        cost = ModelCost.from_config(cfg.model, cfg.data.seq_length, self.vocab_rows)
        for cb in self.callbacks:
            cb.adjust_cost(ctx, cost)
        tokens_per_sec = batch * cfg.data.seq_length / step_time
        flops_per_token = cost.training_flops_per_token()
        rank_flops = flops_per_token * tokens_per_sec / dist.get_world_size()
        record = {
            "step": ctx.step,
            "loss": result.loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": result.grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "consumed_samples": ctx.consumed_samples,
            "skipped_steps": self.summary.skipped_steps,
            "model_flops_per_token": flops_per_token,
            "tflops_per_rank": rank_flops / 1e12,
            "mfu": self.peak.mfu(rank_flops),
            **result.modality_losses,
        }
        if self.cfg.stages or self.cfg.train.rampup_batch_size:  # a schedule whose batch or stage moves
            record.update(
                global_batch_size=batch, consumed_tokens=self.schedule.consumed_tokens(ctx.step), stage=self.stage.index
            )
        with self.observer.timed("callbacks"):
            for cb in self.callbacks:
                record.update(checked_metrics(cb, cb.on_step_end(ctx, result), record))
        return record

    def evaluate_and_log(self, record: Dict[str, float]) -> None:
        """Every ``train.eval_interval`` steps add the validation loss; every ``logging.log_interval``
        steps (and the last) add peak memory and the interval's mean loss, write the record and print
        the progress line."""
        cfg, t, step = self.cfg, self.cfg.train, self.ctx.step
        if t.eval_interval and step % t.eval_interval == 0:
            record["val/loss"] = self.validation_loss()
        if step % cfg.logging.log_interval == 0 or step == t.steps:
            record["mem/peak_gib"] = peak_memory_gib(self.cuda)  # collective: every rank logs
            record["loss/interval_mean"] = (
                sum(self.interval_losses) / len(self.interval_losses) if self.interval_losses else float("nan")
            )
            self.interval_losses.clear()
            record.update(self.observer.interval_metrics())  # collectives
            self.run_dir.log(record)
            self.observer.write(record)
            if self.rank0:
                self.log(self.progress_line(record) + self.observer.progress(record))

    def progress_line(self, record: Dict[str, float]) -> str:
        """One line per logged step. ``loss``: the mean over the steps since the previous line (as
        Megatron-LM prints it); a step that trains a sampled sub-network logs that sub-network's loss.
        ``val``: the full network's, at evaluation steps."""
        steps = self.cfg.train.steps
        done = record["step"] - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (steps - record["step"])
        extra = f" | val {record['val/loss']:.4f}" if "val/loss" in record else ""
        where = f" | {self.stage.name}" if self.cfg.stages else ""
        ramp = f" | batch {record['global_batch_size']}" if self.schedule.batch_varies else ""
        return (
            f"step {record['step']:>6}/{steps}{where}{ramp} | loss {record['loss/interval_mean']:.4f}{extra} | "
            f"lr {record['lr']:.3e} | grad {record['grad_norm']:.3f} | {record['tokens_per_sec']:,.0f} tok/s | "
            f"{record['tflops_per_rank']:.3g} TFLOP/s/rank | MFU {100 * record['mfu']:.1f}% | "
            f"mem {record['mem/peak_gib']:.2f} GiB | ETA {timedelta(seconds=int(eta))}"
        )

    def checkpoint(self, stopping: bool) -> bool:
        """Save every ``checkpoint.save_interval`` steps before the last (the end has its own save),
        and when stopping; returns ``stopping``."""
        interval, step = self.cfg.checkpoint.save_interval, self.ctx.step
        self.finish_save(blocking=False)
        if stopping or (interval and step % interval == 0 and step < self.cfg.train.steps):
            self.save()
        if stopping:
            self.summary.stopped_by_signal = True
            self.log_rank0(f"stop signal received: checkpointed at step {step}, exiting")
        return stopping

    def save(self) -> None:
        self.finish_save(blocking=True)  # one save in flight at most
        self.watchdog.enter("save", self.ctx.step)
        path = self.checkpoints.save(self.ctx.step, self.model, self.optimizer, self.common_state())
        self.log_rank0(
            f"saving checkpoint {path} in the background" if self.checkpoints.async_save else f"saved checkpoint {path}"
        )

    def finish_save(self, blocking: bool) -> None:
        """Publish the asynchronous save in flight once written (every rank; ``blocking``: wait for it)."""
        if blocking:
            self.watchdog.enter("save", self.ctx.step)
        path = self.checkpoints.finalize(blocking)
        if path is not None:
            self.log_rank0(f"saved checkpoint {path}")

    def common_state(self) -> CommonState:
        """The checkpoint's state beside model and optimizer (the save adds the parallel layout)."""
        return CommonState(
            step=self.ctx.step,
            consumed_samples=self.ctx.consumed_samples,
            skipped_steps=self.summary.skipped_steps,
            scheduler=self.scheduler.state_dict(),
            callbacks={cb.name: cb.state_dict() for cb in self.callbacks},
        )
