"""Checks that need several sections or the launch: run before any process group exists."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List, Optional

from megatron_ext.config import ConfigError
from megatron_ext.models.vocab import padded_vocab_size
from megatron_ext.parallel.sizes import layout_problems
from megatron_ext.run.backend import backend_problems
from megatron_ext.run.config import RunConfig
from megatron_ext.run.hf import init_from_problems, is_hf_dir
from megatron_ext.run.logging_checks import logging_problems
from megatron_ext.run.registry import CAPABILITIES
from megatron_ext.run.schedule import schedule_problems


def checkpoint_dir(path) -> Optional[Path]:
    """The checkpoint that ``path`` names: a ``step_*`` directory itself, or the one the ``latest``
    pointer of a run directory (``path/checkpoints``) or of a checkpoints directory names; None when
    there is none."""
    path = Path(path)
    if (path / "common.pt").is_file():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / "latest"
        if pointer.is_file():
            step = root / pointer.read_text().strip()
            return step if (step / "common.pt").is_file() else None
    return None


def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    """The data-parallel size of ``cfg`` on ``world_size`` ranks (0 when the sizes do not fit)."""
    p = cfg.parallel
    return layout_problems(world_size, tensor=p.tensor, pipeline=p.pipeline, context=p.context)[0]


def check_run(
    cfg: RunConfig, world_size: int, *, cuda: bool, te_installed: Optional[bool] = None, check_data: bool = True
) -> None:
    """Raise ConfigError listing every problem of ``cfg`` for a job of ``world_size`` ranks: the core
    sections' cross checks, then every registered capability's :meth:`~Capability.check`.
    ``te_installed``: whether Transformer Engine imports where the job runs (None: check here).
    ``check_data`` False leaves out what needs the data files (a plan made away from them)."""
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.data
    dp, problems = layout_problems(
        world_size,
        tensor=p.tensor,
        pipeline=p.pipeline,
        context=p.context,
        expert=p.expert,
        expert_tensor=p.expert_tensor,
    )
    if problems:
        problems.append(launch_hint(cfg, world_size))

    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % p.tensor:
        problems.append(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor={p.tensor}"
        )
    if groups % p.tensor:
        problems.append(
            f"model.num_query_groups={groups} is not divisible by parallel.tensor={p.tensor}: "
            "each TP rank must hold whole KV heads"
        )
    if padded_vocab_size(m.vocab_size) % p.tensor:
        problems.append(
            f"padded vocabulary {padded_vocab_size(m.vocab_size)} is not divisible by parallel.tensor={p.tensor}"
        )
    stages = p.pipeline * (p.virtual_pipeline or 1)
    if m.num_layers % stages:
        problems.append(
            f"model.num_layers={m.num_layers} is not divisible by the {stages} pipeline "
            f"stages (parallel.pipeline={p.pipeline} x virtual_pipeline={p.virtual_pipeline or 1})"
        )
    if p.sequence_parallel and p.tensor > 1 and d.seq_length % p.tensor:
        problems.append(
            f"data.seq_length={d.seq_length} is not divisible by parallel.tensor={p.tensor}, "
            "which sequence parallelism needs"
        )
    if p.context > 1:
        if d.seq_length % (2 * p.context):
            problems.append(
                f"data.seq_length={d.seq_length} is not divisible by 2 * parallel.context = "
                f"{2 * p.context} (context parallelism splits the sequence into 2*CP chunks)"
            )
        elif p.sequence_parallel and p.tensor > 1 and (d.seq_length // p.context) % p.tensor:
            problems.append(
                f"data.seq_length={d.seq_length} / parallel.context={p.context} is not divisible by "
                f"parallel.tensor={p.tensor}, which sequence parallelism needs on each CP rank"
            )
        if m.attention_backend == "local":
            problems.append(
                f"parallel.context={p.context} with model.attention_backend='local': Megatron's "
                "DotProductAttention has no context parallelism here; use model.attention_backend: sdpa"
            )
        if m.attention_dropout > 0:
            problems.append(
                f"parallel.context={p.context} with model.attention_dropout={m.attention_dropout}: the "
                "context-parallel attention has no dropout; set model.attention_dropout: 0"
            )
        if m.mtp_num_layers:
            problems.append(
                f"parallel.context={p.context} with model.mtp_num_layers={m.mtp_num_layers}: multi-token "
                "prediction's shifted inputs and targets cross the CP chunks, which is not supported here; "
                "use parallel.context: 1"
            )
    if d.reset_attention_mask and m.attention_backend == "local":
        problems.append(
            "data.reset_attention_mask with model.attention_backend='local': Megatron's DotProductAttention "
            "would need a dense [b, 1, s, s] mask; use model.attention_backend: sdpa, which masks documents"
        )
    max_pos = m.max_position_embeddings or d.seq_length
    if max_pos < d.seq_length:
        problems.append(f"model.max_position_embeddings={max_pos} is shorter than data.seq_length={d.seq_length}")

    if dp:
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            problems.append(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size x data-parallel size = {t.micro_batch_size}*{dp}"
            )
    if t.precision == "bf16" and not cuda:
        problems.append(
            "train.precision='bf16' needs a GPU (the CPU optimizer keeps no fp32 master weights); use 'fp32' or 'auto'"
        )
    problems.extend(backend_problems(cfg, cuda, te_installed=te_installed))
    if t.lr_schedule == "wsd" and t.wsd_decay_steps and t.wsd_decay_steps > t.steps - t.warmup_steps:
        problems.append(
            f"train.wsd_decay_steps={t.wsd_decay_steps} exceeds the steps after warmup ({t.steps - t.warmup_steps})"
        )
    if t.init_from is not None and is_hf_dir(t.init_from):
        with tempfile.TemporaryDirectory() as scratch:
            problems.extend(init_from_problems(cfg, t.init_from, Path(scratch)))
    elif t.init_from is not None and checkpoint_dir(t.init_from) is None:
        problems.append(
            f"train.init_from={t.init_from!r} is not a checkpoint of this project: give a run directory "
            "(its latest checkpoint), its checkpoints/ directory, a step_* checkpoint directory or a HF "
            "model directory (config.json + safetensors)"
        )
    split = d.paths_split  # None with data.valid_paths: validation is those prefixes
    if d.kind in ("indexed", "default") and t.eval_interval and split is not None and float(split.split(",")[1]) == 0:
        problems.append(
            f"train.eval_interval={t.eval_interval} needs validation documents, but data.split="
            f"{split!r} gives the validation part none: give it a share (e.g. '98,2,0'), give "
            "data.valid_paths, or set train.eval_interval: 0"
        )
    if d.kind == "default":
        from megatron_ext.data.default_corpus import default_vocab_size

        if m.vocab_size < default_vocab_size():
            problems.append(
                f"model.vocab_size={m.vocab_size} is smaller than the built-in corpus's "
                f"{default_vocab_size()} ids (data.kind='default'): set model.vocab_size >= "
                f"{default_vocab_size()}"
            )
    if d.kind == "indexed" and check_data:
        problems.extend(_indexed_data_problems(cfg))
    if check_data:
        problems.extend(_validation_size_problems(cfg))
    problems.extend(logging_problems(cfg, world_size=world_size, data_parallel=dp, cuda=cuda))
    for capability in CAPABILITIES:
        problems.extend(capability.check(cfg, world_size=world_size, data_parallel=dp, cuda=cuda))
    problems.extend(schedule_problems(cfg, world_size, dp, cuda=cuda, te_installed=te_installed, check_data=check_data))
    if problems:
        raise ConfigError(problems)


def invoked_command() -> str:
    """The command line of this process as ``-m pretrain.TOOL ARGS`` when a project tool runs (the
    module and its own arguments, for a launch hint), else ``-m pretrain.train --config CONFIG``."""
    import shlex
    import sys

    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.parent.name == "pretrain" and script.suffix == ".py":
        return f"-m pretrain.{script.stem} {shlex.join(sys.argv[1:])}".rstrip()
    return "-m pretrain.train --config CONFIG.yaml"


def launch_hint(cfg: RunConfig, world_size: int, command: Optional[str] = None) -> Optional[str]:
    """What to do when the parallel layout of ``cfg`` does not fit ``world_size`` ranks, in one
    sentence: the fewest ranks it runs on with the ``torchrun`` line that starts them (``command``:
    the module and its arguments), or the ``--set`` overrides that fit it to the ranks there are
    (checkpoints reshard on load, so any layout loads them); None when the layout fits. ``command``
    defaults to this process's own (:func:`invoked_command`)."""
    command = command or invoked_command()
    p = cfg.parallel
    sizes = {
        "tensor": p.tensor,
        "pipeline": p.pipeline,
        "context": p.context,
        "expert": p.expert,
        "expert_tensor": p.expert_tensor,
    }
    if not layout_problems(world_size, **sizes)[1]:
        return None
    most = p.tensor * p.pipeline * p.context * p.expert * (p.expert_tensor or p.tensor)  # always fits
    fewest = next(n for n in range(1, most + 1) if not layout_problems(n, **sizes)[1])
    split = {name: size for name, size in sizes.items() if size not in (None, 1)}
    overrides = [f"--set parallel.{name}=1" for name in split]
    if p.virtual_pipeline is not None:  # interleaving needs pipeline > 1
        overrides.append("--set parallel.virtual_pipeline=null")
    layout = ", ".join(f"parallel.{name}={size}" for name, size in split.items())
    return (
        f"the layout {layout} runs on a multiple of {fewest} ranks and this job has {world_size}: start it "
        f"with `torchrun --nproc-per-node {fewest} {command}` (python -m pretrain.launch takes the same "
        f"options), or fit the layout to {world_size} rank(s) with `{' '.join(overrides)}` (a checkpoint "
        "loads at any layout)"
    )


def _validation_size_problems(cfg: RunConfig) -> List[str]:
    """An evaluation must fit in one pass over the validation set (Megatron would otherwise build
    and run epoch after epoch of it): the ``data.split`` share of the training prefixes, or all of
    ``data.valid_paths``; checked from the datasets' manifests, where they exist."""
    import json

    d, t = cfg.data, cfg.train
    if not t.eval_interval or d.kind not in ("indexed", "default"):
        return []
    if d.kind == "default":
        from megatron_ext.data.default_corpus import VERSION

        manifests = [Path(d.cache_dir) / VERSION / "corpus.manifest.json"]
    else:
        manifests = [Path(f"{prefix}.manifest.json") for prefix in d.valid_paths or d.paths]
    if not all(path.is_file() for path in manifests):
        return []  # built on first use / reported by the data checks
    try:
        total = sum(json.loads(path.read_text())["tokens"] for path in manifests)
        shares = [float(x) for x in d.paths_split.split(",")] if d.paths_split else [0.0, 1.0, 0.0]
    except (ValueError, KeyError, TypeError):
        return []
    valid_tokens = int(total * shares[1] / sum(shares))
    per_batch = t.global_batch_size * d.seq_length
    if t.eval_steps * per_batch <= valid_tokens:
        return []
    fits = valid_tokens // per_batch
    if d.valid_paths:
        where, larger = f"data.valid_paths holds about {valid_tokens:,}", "give data.valid_paths more documents"
    else:
        where = f"the validation split holds about {valid_tokens:,} (data.split={d.paths_split!r})"
        larger = "give validation a larger share of data.split"
    return [
        f"train.eval_steps={t.eval_steps} evaluates {t.eval_steps * per_batch:,} tokens per evaluation, but "
        f"{where}: "
        + (f"set train.eval_steps <= {fits}" if fits else larger)
        + " (an evaluation must not repeat validation data)"
    ]


def _indexed_data_problems(cfg: RunConfig) -> List[str]:
    """The prefixes of ``data.paths`` / ``data.valid_paths`` (and ``data.tokenizer``) as this machine
    sees them: missing or damaged files, a vocabulary or tokenizer that does not match."""
    from megatron_ext.data.indexed import DataError, check_prefix

    d, problems = cfg.data, []
    identity = None
    if d.tokenizer is not None:
        try:
            identity = _identity(d.tokenizer)
        except (FileNotFoundError, ValueError, ImportError) as err:
            return [f"data.tokenizer: {err}"]
    for name, prefixes in (("data.paths", d.paths), ("data.valid_paths", d.valid_paths)):
        for prefix in prefixes:
            try:
                check_prefix(prefix, cfg.model.vocab_size, identity)
            except (DataError, FileNotFoundError, ValueError) as err:
                problems.append(f"{name}: {err}")
    return problems


def _identity(tokenizer_spec: str) -> str:
    from megatron_ext.data.tokenizers import load_tokenizer

    return load_tokenizer(tokenizer_spec).identity
