"""Evaluation tasks during training (``train.eval_tasks``): the tasks of ``pretrain.evaluate --tasks``
on the live model every ``interval`` steps and after the last, logged as ``eval/<task>/<metric>``.

The model is scored as it is at that step, with the structure the capabilities gave it (hybrid
layers in mask learning run their gates' expected mixture, the elastic full network), in eval mode
and without gradients, then put back in training mode. Every rank holds the whole model (the layout
check allows tensor, pipeline, context and expert parallel size 1 only) and evaluates it, so that no
rank waits on another; rank 0 writes ``eval/<step>/<task>.json``. ``pretrain.train`` adds the callback
when the config lists tasks (the training loop refuses such a config without it). Generation tasks need the cached
decoder, which a hybrid layer in mask learning does not have: they are skipped during stage 1 (said
once in the log).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

from megatron_ext.capability.callbacks import Callback, TrainContext

__all__ = ["EvalTasksCallback", "eval_tasks_problems", "metric_name", "training_callbacks"]


def metric_name(task: str, metric: str) -> str:
    """``eval/<task>/<metric>``, lm-eval's filter suffix (``acc,none``) dropped."""
    return f"eval/{task}/{metric.replace(',none', '').replace(',', '_')}"


def eval_tasks_problems(cfg) -> List[str]:
    """What in ``train.eval_tasks`` cannot run, before any work: unknown tasks or options, a layout
    that shards the model, text tasks without a tokenizer."""
    e = cfg.train.eval_tasks
    if not e.tasks:
        return []
    from megatron_ext.evaluation.tasks_runner import check_options, check_task_names

    p = cfg.parallel
    problems = []
    sharded = {name: size for name, size in (("tensor", p.tensor), ("pipeline", p.pipeline)) if size > 1}
    sharded.update({name: size for name, size in (("context", p.context), ("expert", p.expert)) if size > 1})
    if sharded:
        problems.append(
            f"train.eval_tasks evaluates the whole model on every rank; parallel.{', parallel.'.join(sharded)} "
            f"> 1 shards it ({sharded}): evaluate the checkpoints with python -m pretrain.evaluate --tasks instead"
        )
    try:
        lm_tasks, _ = check_task_names(e.tasks)
        check_options(e.tasks, dict(e.options))
    except ValueError as err:
        return problems + [f"train.eval_tasks: {err}"]
    if lm_tasks and cfg.data.kind in ("synthetic", "copy") and not cfg.data.tokenizer:
        problems.append(
            f"train.eval_tasks {lm_tasks} are text tasks and data.kind={cfg.data.kind!r} has no tokenizer: "
            "set data.tokenizer, or keep to the project's own tasks (passkey, needle, extrapolation)"
        )
    return problems


def training_callbacks(cfg, log: Callable = print) -> List[Callback]:
    """The callbacks a run of ``cfg`` needs from this package (``[EvalTasksCallback]`` when
    ``train.eval_tasks`` lists tasks); ConfigError, before any work, for what cannot run."""
    if not cfg.train.eval_tasks.tasks:
        return []
    from megatron_ext.config import ConfigError

    problems = eval_tasks_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return [EvalTasksCallback(cfg, log)]


class EvalTasksCallback(Callback):
    """See the module doc."""

    name = "eval_tasks"
    metric_prefixes = ("eval/",)

    def __init__(self, cfg, log: Callable = print):
        self.cfg = cfg
        self.log = log
        self._said_skipped = False

    def _due(self, step: int) -> bool:
        e = self.cfg.train.eval_tasks
        return step == self.cfg.train.steps or bool(e.interval and step % e.interval == 0)

    def on_step_end(self, ctx: TrainContext, result) -> Dict[str, float]:
        if not self._due(ctx.step):
            return {}
        from megatron_ext.evaluation.model import EvalModel
        from megatron_ext.evaluation.tasks_runner import check_task_names, evaluate_tasks, write_results
        from megatron_ext.inference.generate import run_tokenizer
        from megatron_ext.training.capabilities import batch_hooks

        e = self.cfg.train.eval_tasks
        model = getattr(ctx.model[0], "module", ctx.model[0])
        tasks = self._runnable(model, e.tasks, check_task_names)
        device = next(model.parameters()).device
        evaluated = EvalModel(
            model=model,
            cfg=self.cfg,
            run_dir=Path(ctx.run_dir),
            step=ctx.step,
            tokenizer=run_tokenizer(self.cfg, Path(ctx.run_dir)),
            hooks=list(batch_hooks(self.cfg)),
            device=device,
        )
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                results = evaluate_tasks(evaluated, tasks, limit=e.limit, options=dict(e.options))
        finally:
            model.train(was_training)
        if dist.get_rank() == 0:
            write_results(Path(ctx.run_dir), ctx.step, results, limit=e.limit)
        return {
            metric_name(task, metric): float(value)
            for task, result in results.items()
            for metric, value in (result.get("metrics") or {}).items()
            if "stderr" not in metric
        }

    def _runnable(self, model, tasks: List[str], check_task_names) -> List[str]:
        """``tasks`` without the generation tasks while a hybrid layer is in mask learning."""
        from megatron_ext.models.protocols import KeyPlanAttention

        try:
            for module in model.modules():
                if isinstance(module, KeyPlanAttention):
                    module.kv_cache_plan()
        except ValueError:
            generating = self._generation_tasks(tasks, check_task_names)
            if generating and not self._said_skipped and dist.get_rank() == 0:
                self.log(f"eval_tasks: {generating} generate, which gated layers cannot: skipped until binarization")
                self._said_skipped = True
            return [task for task in tasks if task not in generating]
        return list(tasks)

    @staticmethod
    def _generation_tasks(tasks: List[str], check_task_names) -> List[str]:
        lm_tasks, ours = check_task_names(tasks)
        generating = [t for t in ours if t in ("passkey", "needle")]
        if lm_tasks:
            from megatron_ext.evaluation.tasks_runner import task_manager

            loaded = task_manager().load_task_or_group(list(lm_tasks))
            generating += [task for task in lm_tasks if _generates(loaded.get(task))]
        return generating


def _generates(task) -> bool:
    """Whether an lm-eval task (or any task of a group, given as a dict) asks for generations."""
    if isinstance(task, dict):
        return any(_generates(sub) for sub in task.values())
    return getattr(task, "OUTPUT_TYPE", None) == "generate_until"
