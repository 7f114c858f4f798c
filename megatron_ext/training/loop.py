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
from typing import Callable, List, Sequence

import torch
import torch.distributed as dist

from megatron_ext.capability import Callback, TrainContext
from megatron_ext.compat import enable_cpu_support
from megatron_ext.data.builder import build_datasets
from megatron_ext.models.builder import build_model, params_dtype
from megatron_ext.models.flops import ModelCost
from megatron_ext.models.vocab import padded_vocab_size
from megatron_ext.optim import build_optimizer
from megatron_ext.parallel import ParallelSizes, destroy_parallel_state, initialize_parallel_state
from megatron_ext.parallel.state import comm_device, init_distributed, process_groups
from megatron_ext.run import RunConfig, check_run, data_parallel_size
from megatron_ext.run.checks import checkpoint_dir
from megatron_ext.run.hf import is_hf_dir
from megatron_ext.training.capabilities import capability_callbacks
from megatron_ext.training.checkpoint import CheckpointManager, load_model_weights
from megatron_ext.training.ddp import release_ddp, wrap_with_ddp
from megatron_ext.training.hf import convert_for_init
from megatron_ext.training.rundir import RunDirectory
from megatron_ext.training.signals import StopRequest
from megatron_ext.training.step import eval_step, global_batch_iterator, run_forward_step, train_step
from megatron_ext.training.throughput import peak_flops_per_rank


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class TrainSummary:
    """What a finished (or stopped) run reports."""

    final_step: int
    stopped_by_signal: bool
    losses: List[float] = field(default_factory=list)
    skipped_steps: int = 0


def _scheduler(cfg: RunConfig, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    style = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}[t.lr_schedule]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.steps,
        lr_decay_style=style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
        wsd_decay_steps=t.wsd_decay_steps,
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
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
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
        self.callbacks = list(capability_callbacks(cfg, log).values()) + list(callbacks)
        self.log = log

    def run(self) -> TrainSummary:
        cfg = self.cfg
        cuda = torch.cuda.is_available()
        enable_cpu_support()
        world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        check_run(cfg, world_size, cuda=cuda)  # before any process group exists
        init_distributed(cuda)
        p = cfg.parallel
        initialize_parallel_state(
            ParallelSizes(tp=p.tensor, pp=p.pipeline, cp=p.context, ep=p.expert, etp=p.expert_tensor,
                          vpp=p.virtual_pipeline),
            seed=cfg.train.seed,
        )
        try:
            return self._train(cuda)
        finally:
            destroy_parallel_state()

    def _train(self, cuda: bool) -> TrainSummary:
        from megatron.core import parallel_state

        cfg, t = self.cfg, self.cfg.train
        rank0 = dist.get_rank() == 0
        run_dir = RunDirectory(self.run_dir_path, is_writer=rank0)
        run_dir.write_config(cfg)
        dist.barrier()

        opt_config = optimizer_config(cfg, cuda)
        model = wrap_with_ddp(build_model(cfg, cuda=cuda), overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                              use_distributed_optimizer=opt_config.use_distributed_optimizer)
        optimizer = build_optimizer(opt_config, model)
        scheduler = _scheduler(cfg, optimizer)
        checkpoints = CheckpointManager(run_dir.checkpoints, cfg.checkpoint.keep_last)
        ctx = TrainContext(config=cfg, model=model, optimizer=optimizer, run_dir=run_dir.path,
                           pg_collection=process_groups())
        summary = TrainSummary(final_step=0, stopped_by_signal=False)

        latest = (checkpoints.latest_verified(log=(self.log if rank0 else lambda line: None))
                  if cfg.checkpoint.resume else None)
        if latest is not None:
            common = checkpoints.load(latest, model, optimizer, cfg.checkpoint.load_optimizer)
            ctx.step, ctx.consumed_samples = common["step"], common["consumed_samples"]
            summary.skipped_steps = common.get("skipped_steps", 0)
            if cfg.checkpoint.load_optimizer:
                scheduler.load_state_dict(common["scheduler"])
            for cb in self.callbacks:
                cb.load_state_dict(common["callbacks"].get(cb.name, {}))
            if rank0:
                self.log(f"resumed from {latest} at step {ctx.step}"
                         + ("" if common["restored_rng"] else " (new layout: RNG streams restarted)"))
        elif t.init_from is not None:
            source = (convert_for_init(Path(t.init_from), run_dir.path, cfg) if is_hf_dir(t.init_from)
                      else checkpoint_dir(t.init_from))
            load_model_weights(source, model)
            if rank0:
                self.log(f"initialized the model weights from {source}; starting at step 0")
        run_dir.start_metrics(ctx.step, cfg.logging.tensorboard)

        num_micro = t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())
        seq = cfg.data.seq_length
        train_data, valid_data = build_datasets(cfg)
        device = comm_device()  # the model's: this rank's GPU under NCCL
        forward_step = run_forward_step(cfg, device)

        def micro_batches(dataset, consumed):
            return global_batch_iterator(dataset, consumed, cfg, len(model), device)

        def validation_loss() -> float:
            return sum(
                eval_step(model, micro_batches(valid_data, i * t.global_batch_size),
                          num_microbatches=num_micro, seq_length=seq,
                          micro_batch_size=t.micro_batch_size, forward_step_func=forward_step)
                for i in range(t.eval_steps)
            ) / t.eval_steps

        ctx.evaluate = validation_loss if valid_data is not None else None

        def common_state():
            return {
                "consumed_samples": ctx.consumed_samples,
                "skipped_steps": summary.skipped_steps,
                "scheduler": scheduler.state_dict(),
                "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
            }

        peak, peak_source = peak_flops_per_rank(cuda, params_dtype(cfg, cuda), cfg.logging.peak_tflops_per_rank,
                                                comm_device=device)
        if rank0:
            self.log(f"mfu against {peak / 1e12:.3g} TFLOP/s per rank ({peak_source})")
        world = dist.get_world_size()
        vocab_rows = padded_vocab_size(cfg.model.vocab_size)

        stop = StopRequest()
        stop.install()
        for cb in self.callbacks:
            cb.on_train_start(ctx)
        streak = 0
        interval_losses: List[float] = []  # finite losses since the last logged step
        start_step, start_time = ctx.step, time.perf_counter()
        try:
            while ctx.step < t.steps:
                for cb in self.callbacks:
                    cb.on_step_begin(ctx)
                step_start = time.perf_counter()
                result = train_step(
                    model, optimizer, micro_batches(train_data, ctx.consumed_samples),
                    num_microbatches=num_micro, seq_length=seq, micro_batch_size=t.micro_batch_size,
                    forward_step_func=forward_step, opt_param_scheduler=scheduler, increment=1,
                )
                ctx.step += 1
                ctx.consumed_samples += t.global_batch_size
                step_time = time.perf_counter() - step_start
                finite = result.update_successful and math.isfinite(result.loss)
                streak = 0 if finite else streak + 1
                summary.skipped_steps += 0 if result.update_successful else 1
                if streak >= t.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{streak} consecutive steps (up to step {ctx.step}) had a non-finite loss or "
                        f"gradient norm (loss {result.loss}, grad norm {result.grad_norm}); the updates "
                        "were skipped. Lower train.lr, check the data, or resume from the last checkpoint."
                    )
                summary.losses.append(result.loss)
                if finite:
                    interval_losses.append(result.loss)
                cost = ModelCost.from_config(cfg, vocab_rows)
                for cb in self.callbacks:
                    cb.adjust_cost(ctx, cost)
                tokens_per_sec = t.global_batch_size * seq / step_time
                flops_per_token = cost.training_flops_per_token()
                rank_flops = flops_per_token * tokens_per_sec / world
                record = {
                    "step": ctx.step,
                    "loss": result.loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": result.grad_norm,
                    "tokens_per_sec": tokens_per_sec,
                    "consumed_samples": ctx.consumed_samples,
                    "skipped_steps": summary.skipped_steps,
                    "model_flops_per_token": flops_per_token,
                    "tflops_per_rank": rank_flops / 1e12,
                    "mfu": rank_flops / peak,
                    **result.modality_losses,
                }
                for cb in self.callbacks:
                    record.update(cb.on_step_end(ctx, result))
                if t.eval_interval and ctx.step % t.eval_interval == 0:
                    record["val/loss"] = validation_loss()
                if ctx.step % cfg.logging.log_interval == 0 or ctx.step == t.steps:
                    record["mem/peak_gib"] = peak_memory_gib(cuda)  # collective: every rank logs
                    record["loss/interval_mean"] = (sum(interval_losses) / len(interval_losses)
                                                    if interval_losses else float("nan"))
                    interval_losses.clear()
                    run_dir.log(record)
                    if rank0:
                        self.log(self._progress_line(record, start_step, start_time))
                stopping = stop.agreed()
                interval = cfg.checkpoint.save_interval
                if stopping or (interval and ctx.step % interval == 0 and ctx.step < t.steps):
                    path = checkpoints.save(ctx.step, model, optimizer, common_state())
                    if rank0:
                        self.log(f"saved checkpoint {path}")
                if stopping:
                    summary.stopped_by_signal = True
                    if rank0:
                        self.log(f"stop signal received: checkpointed at step {ctx.step}, exiting")
                    break
            else:
                if cfg.checkpoint.save_at_end:
                    path = checkpoints.save(ctx.step, model, optimizer, common_state())
                    if rank0:
                        self.log(f"saved checkpoint {path}")
            for cb in self.callbacks:
                cb.on_train_end(ctx)
        finally:
            stop.uninstall()
            run_dir.close()
            release_ddp(model)
        summary.final_step = ctx.step
        return summary

    def _progress_line(self, record: dict, start_step: int, start_time: float) -> str:
        """One line per logged step. ``loss``: the mean over the steps since the previous line (as
        Megatron-LM prints it); a step that trains a sampled sub-network logs that sub-network's loss.
        ``val``: the full network's, at evaluation steps."""
        steps = self.cfg.train.steps
        done = record["step"] - start_step
        elapsed = time.perf_counter() - start_time
        eta = elapsed / max(done, 1) * (steps - record["step"])
        extra = f" | val {record['val/loss']:.4f}" if "val/loss" in record else ""
        return (
            f"step {record['step']:>6}/{steps} | loss {record['loss/interval_mean']:.4f}{extra} | "
            f"lr {record['lr']:.3e} | grad {record['grad_norm']:.3f} | {record['tokens_per_sec']:,.0f} tok/s | "
            f"{record['tflops_per_rank']:.3g} TFLOP/s/rank | MFU {100 * record['mfu']:.1f}% | "
            f"mem {record['mem/peak_gib']:.2f} GiB | ETA {timedelta(seconds=int(eta))}"
        )
