"""Execute an experiment spec: every run through the project's launcher, one after the other, then its
evaluations; or submit one SLURM job per run.

Resumable. A run is *finished* when its directory holds ``experiment.json``, written only after the
training reached ``train.steps`` and every evaluation of the spec was measured; a finished run is
skipped, unless the spec's ``evaluations`` changed since (it is then evaluated again, not trained).
A run whose training stopped part-way (a stop signal, a crash, a killed job) is started
again with the same command and run directory, which resumes it from its latest checkpoint (the
training entry's contract); a run whose training is complete but whose evaluations are missing is
only evaluated. A finished run made with other overrides than the spec now gives is an error (the
table would mix two experiments), as is a run directory that another job holds (the launcher's lock).

Stop signals (Ctrl-C, SIGTERM, SIGUSR1) are passed once to the run in progress, whose ranks checkpoint
and exit; the runner then stops and says how to resume. Each run is started in its own session, so a
Ctrl-C in the terminal reaches its launcher once, through the runner. (A runner killed outright,
SIGKILL, leaves the run in progress to finish on its own; its run directory stays locked until then.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from megatron_ext.config import to_dict
from megatron_ext.experiments.spec import ExperimentSpec, PlannedRun, plan_runs

__all__ = [
    "DONE_FILE",
    "ExperimentError",
    "evaluation_commands",
    "run_experiment",
    "submit_slurm",
    "training_command",
    "training_complete",
]

DONE_FILE = "experiment.json"
"""Written into a run directory once its training and evaluations are complete (atomically)."""

_VALIDATION = re.compile(r"validation loss (\S+) over \d+ batches")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class ExperimentError(RuntimeError):
    """A run or an evaluation failed, or the experiment directory disagrees with the spec."""


def _launch(spec: ExperimentSpec, module: str) -> List[str]:
    return [sys.executable, "-m", "pretrain.launch", "--standalone", "--nproc-per-node", str(spec.nproc), "-m", module]


def training_command(spec: ExperimentSpec, run: PlannedRun) -> List[str]:
    """The run's training command (re-running it resumes the run)."""
    sets = [item for o in run.overrides for item in ("--set", o)]
    return _launch(spec, "pretrain.train") + ["--config", spec.base, "--run-dir", str(run.run_dir), *sets]


def _steps_of(run_dir: Path) -> int:
    from megatron_ext.config.loader import load_yaml

    return int(load_yaml(run_dir / "config.yaml")["train"]["steps"])


def training_complete(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` trained all its ``train.steps`` (its metrics reach the last step:
    a run stopped by a signal exits 0 too, short of it)."""
    from megatron_ext.training.rundir import read_metrics

    metrics = Path(run_dir) / "metrics.jsonl"
    if not (Path(run_dir) / "config.yaml").is_file() or not metrics.is_file():
        return False
    records = read_metrics(metrics)
    return bool(records) and records[-1]["step"] >= _steps_of(Path(run_dir))


def _sub_args(sub) -> List[str]:
    args = []
    if sub.layers is not None:
        args += ["--layers", sub.layers]
    if sub.experts is not None:
        args += ["--experts", sub.experts]
    if sub.top_k is not None:
        args += ["--top-k", str(sub.top_k)]
    return args


def window_overrides(window: int) -> List[str]:
    """``--set`` overrides that put every KV head of a model on a sliding window of ``window`` keys (the
    rule-based head-wise allocation at rho = 1), for the window cost."""
    return [
        "hybrid_attention.enabled=true",
        "hybrid_attention.method=rule_head",
        "hybrid_attention.granularity=kv_head",
        "hybrid_attention.target=1.0",
        "hybrid_attention.sink_tokens=0",
        f"hybrid_attention.window={window}",
    ]


def evaluation_commands(spec: ExperimentSpec, run: PlannedRun) -> Dict[str, List[str]]:
    """``{figure: command}`` of the validation-loss evaluations of ``run`` (``pretrain.evaluate`` on the
    run's ranks): ``val_loss``, ``sub/<name>`` per sub-network, and for the shared start with
    ``window_cost`` the loss with every KV head on the window (``val_loss_all_swa``)."""
    e = spec.evaluations
    # One rank needs no launcher (pretrain.evaluate sets up its own one-process group).
    start = _launch(spec, "pretrain.evaluate") if spec.nproc > 1 else [sys.executable, "-m", "pretrain.evaluate"]
    # The validation split holds the batches of the run's own evaluations: as many as measured here.
    batches = ["--batches", str(e.validation_batches), "--set", f"train.eval_steps={e.validation_batches}"]
    base = start + ["--run-dir", str(run.run_dir), *batches]
    commands = {"val_loss": base}
    if run.is_start:
        if e.window_cost is not None:
            commands["val_loss_all_swa"] = base + [x for o in window_overrides(e.window_cost) for x in ("--set", o)]
        return commands
    for sub in e.subnetworks:
        commands[f"sub/{sub.name}"] = base + _sub_args(sub)
    return commands


def _task_command(spec: ExperimentSpec, run: PlannedRun) -> List[str]:
    e = spec.evaluations
    cmd = [sys.executable, "-m", "pretrain.evaluate", "--run-dir", str(run.run_dir), "--tasks", ",".join(e.tasks)]
    if e.task_limit is not None:
        cmd += ["--limit", str(e.task_limit)]
    for key, value in e.task_options.items():
        cmd += ["--option", f"{key}={value}"]
    return cmd


def _task_scores(run_dir: Path, tasks: Sequence[str]) -> Dict[str, float]:
    """``{task/<task>/<metric>: value}`` from the newest ``eval/<step>/<task>.json`` of each task."""
    scores = {}
    for task in tasks:
        found = sorted(Path(run_dir).glob(f"eval/*/{task}.json"), key=lambda p: int(p.parent.name))
        if not found:
            raise ExperimentError(f"{run_dir}: pretrain.evaluate wrote no result for task {task!r}")
        metrics = json.loads(found[-1].read_text()).get("metrics") or {}
        for name, value in metrics.items():
            if "stderr" not in name and isinstance(value, (int, float)) and not isinstance(value, bool):
                scores[f"task/{task}/{name.replace(',none', '')}"] = float(value)
    return scores


class _Child:
    """The one subprocess in progress, and the stop signal (if any) passed on to it."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.stopped_by: Optional[int] = None

    def _forward(self, signum, frame):
        if self.stopped_by is None and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
        self.stopped_by = self.stopped_by or signum

    def __enter__(self) -> "_Child":
        """Catch the stop signals for the whole experiment (also between its subprocesses)."""
        self._previous = {s: signal.signal(s, self._forward) for s in _STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def status(self) -> int:
        """The runner's exit status after a stop: 0 for SIGUSR1 (a planned stop, as the launcher's),
        else 128 + the signal."""
        return 0 if self.stopped_by == signal.SIGUSR1 else 128 + int(self.stopped_by)

    def run(self, cmd: List[str], *, capture: bool) -> subprocess.CompletedProcess:
        """Run ``cmd`` to its end (nothing is started once a stop signal has arrived)."""
        if self.stopped_by is not None:
            return subprocess.CompletedProcess(cmd, 128 + int(self.stopped_by), "")
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE if capture else None,
                stderr=subprocess.STDOUT if capture else None,
                text=True,
                start_new_session=True,  # a terminal's Ctrl-C reaches it through _forward, once
            )
            out, _ = self.proc.communicate()
            return subprocess.CompletedProcess(cmd, self.proc.returncode, out or "")
        finally:
            self.proc = None


def _write_done(run_dir: Path, record: dict) -> None:
    path = Path(run_dir) / DONE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_done(run_dir: Path) -> Optional[dict]:
    """The run's ``experiment.json`` (None: not finished)."""
    path = Path(run_dir) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _check_same_overrides(run: PlannedRun, done: dict) -> None:
    if list(done.get("overrides", [])) != list(run.overrides):
        raise ExperimentError(
            f"{run.run_dir} finished with the overrides {done.get('overrides')}, but the spec now gives "
            f"{list(run.overrides)}: move that directory away to rerun it, or restore the spec"
        )


def run_experiment(spec: ExperimentSpec, *, evaluate_only: bool = False, log: Callable[[str], None] = print) -> int:
    """Train and evaluate every run of ``spec`` that is not finished, in order; 0 when all are finished,
    the stop signal's status when one interrupted a run (its checkpoint is kept: run again to resume).
    With ``evaluate_only`` no training starts (runs trained elsewhere, e.g. by SLURM jobs, are
    evaluated; untrained ones are listed)."""
    with _Child() as child:
        return _run_all(spec, child, evaluate_only, log)


def _run_all(spec: ExperimentSpec, child: _Child, evaluate_only: bool, log: Callable[[str], None]) -> int:
    runs = plan_runs(spec)
    # A finished run whose record names other evaluations (or none: written before they were
    # recorded) is evaluated again, without training.
    evaluations = to_dict(spec.evaluations)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    untrained = []
    for index, run in enumerate(runs, 1):
        where = f"[experiment {spec.name}] {index}/{len(runs)} {run.key}"
        done = read_done(run.run_dir)
        if done is not None:
            _check_same_overrides(run, done)
            if done.get("evaluations") == evaluations:
                log(f"{where}: finished, skipped")
                continue
            log(f"{where}: trained; the spec's evaluations changed since it was evaluated")
        if not training_complete(run.run_dir):
            if evaluate_only:
                untrained.append(run.key)
                continue
            resuming = (run.run_dir / "checkpoints" / "latest").is_file()
            log(f"{where}: {'resuming' if resuming else 'training'} in {run.run_dir}")
            result = child.run(training_command(spec, run), capture=False)
            if child.stopped_by is not None:
                log(f"{where}: stopped by {signal.Signals(child.stopped_by).name}; run the same command to resume")
                return child.status()
            if result.returncode != 0:
                raise ExperimentError(
                    f"{run.key}: training failed (status {result.returncode}); its messages are above"
                )
            if not training_complete(run.run_dir):
                raise ExperimentError(f"{run.key}: training exited before train.steps: run the same command to resume")
        log(f"{where}: evaluating")
        figures = {}
        for figure, cmd in evaluation_commands(spec, run).items():
            result = child.run(cmd, capture=True)
            if child.stopped_by is not None:
                log(f"{where}: stopped during the evaluations; run the same command to finish them")
                return child.status()
            match = _VALIDATION.search(result.stdout)
            if result.returncode != 0 or match is None:
                raise ExperimentError(
                    f"{run.key}: {' '.join(cmd)} failed (status {result.returncode}):\n{result.stdout}"
                )
            figures[figure] = float(match.group(1))
        if run.is_start and "val_loss_all_swa" in figures:
            figures["window_cost"] = figures["val_loss_all_swa"] - figures["val_loss"]
            log(
                f"{where}: window cost (W={spec.evaluations.window_cost}) {figures['window_cost']:+.4f} nats "
                f"({figures['val_loss_all_swa']:.4f} all SWA vs {figures['val_loss']:.4f} full attention)"
            )
        if spec.evaluations.tasks and not run.is_start:
            result = child.run(_task_command(spec, run), capture=True)
            if child.stopped_by is not None:
                log(f"{where}: stopped during the evaluations; run the same command to finish them")
                return child.status()
            if result.returncode != 0:
                raise ExperimentError(f"{run.key}: tasks failed (status {result.returncode}):\n{result.stdout}")
            figures.update(_task_scores(run.run_dir, spec.evaluations.tasks))
        record = {
            "label": run.label,
            "seed": run.seed,
            "overrides": list(run.overrides),
            "evaluations": evaluations,
            "figures": figures,
        }
        _write_done(run.run_dir, record)
        log(f"{where}: finished ({', '.join(f'{k} {v:.4f}' for k, v in figures.items())})")
    if untrained:
        log(f"[experiment {spec.name}] not trained yet: {', '.join(untrained)}")
        return 1
    log(f"[experiment {spec.name}] all {len(runs)} runs finished: megatron-ext experiment report to tabulate them")
    return 0


def sbatch_command(spec: ExperimentSpec, run: PlannedRun, dependency: Optional[str]) -> List[str]:
    """``sbatch`` of the project's script for ``run`` (its run directory through ``RUN_DIR``; after the
    job ``dependency`` has succeeded when given)."""
    s = spec.slurm
    cmd = ["sbatch", "--parsable", f"--job-name={spec.name}-{run.key.replace('/', '-')}", f"--nodes={s.nodes}"]
    if s.gpus_per_node is not None:
        cmd.append(f"--gpus-per-node={s.gpus_per_node}")
    cmd += list(s.options)
    if dependency is not None:
        cmd.append(f"--dependency=afterok:{dependency}")
    cmd += [f"--export=ALL,RUN_DIR={run.run_dir},NODES={s.nodes}", s.script, "--config", spec.base]
    return cmd + [item for o in run.overrides for item in ("--set", o)]


def submit_slurm(
    spec: ExperimentSpec, *, sbatch: Callable[[List[str]], str] = None, log: Callable[[str], None] = print
) -> Dict[str, str]:
    """Submit one job per run whose training is not complete (the shared start first; the variants
    depend on it with ``afterok``); returns ``{run key: job id}``, also written to
    ``<output>/slurm_jobs.json``. The evaluations follow with ``experiment run SPEC --evaluate-only``
    once the jobs are done (where the run's ranks fit)."""
    if not Path(spec.slurm.script).is_file():
        raise ExperimentError(f"slurm.script: {spec.slurm.script} does not exist (submit from the repository root)")
    sbatch = sbatch or _sbatch
    if not any(o.startswith(("--output", "-o")) for o in spec.slurm.options):
        Path("logs").mkdir(exist_ok=True)  # the scripts' own --output=logs/%x-%j.out
    jobs: Dict[str, str] = {}
    start_job = None
    for run in plan_runs(spec):
        if read_done(run.run_dir) is not None or training_complete(run.run_dir):
            log(f"[experiment {spec.name}] {run.key}: trained, not submitted")
            continue
        job = sbatch(sbatch_command(spec, run, None if run.is_start else start_job))
        jobs[run.key] = job
        if run.is_start:
            start_job = job
        log(f"[experiment {spec.name}] {run.key}: job {job}")
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    (spec.output_dir / "slurm_jobs.json").write_text(json.dumps(jobs, indent=1))
    return jobs


def _sbatch(cmd: List[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ExperimentError(f"{' '.join(cmd)} failed (status {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]  # --parsable: "<job id>[;<cluster>]"
