"""Observability of a run: W&B offline files, the profiler window, the timer breakdown, per-layer
norms, and the slow-rank warning, on real (tiny) training runs."""

import json
import math
import struct
import time
from pathlib import Path

import pytest

from megatron_ext.capability import Callback
from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from megatron_ext.training.wandb_logger import scalars
from tests.configs import EVERY_CAPABILITY, TINY, merge


class SleepOnRank(Callback):
    """Holds one rank back: sleeps before every step there (every rank's, for rank -1)."""

    name = "sleep"

    def __init__(self, rank, seconds):
        self.rank, self.seconds = rank, seconds

    def on_step_begin(self, ctx):
        import torch.distributed as dist

        if self.rank in (-1, dist.get_rank()):
            time.sleep(self.seconds)


class DrawPlot(Callback):
    """Draws ``plots/curve.png`` at one step (rank 0), as the capabilities draw theirs."""

    name = "draw"

    def __init__(self, step):
        self.step = step

    def on_step_end(self, ctx, result):
        import torch.distributed as dist

        from megatron_ext.plotting import pyplot

        if ctx.step == self.step and dist.get_rank() == 0:
            plt = pyplot()
            fig, ax = plt.subplots(figsize=(2, 2))
            ax.plot([0, 1], [1, 0])
            fig.savefig(Path(ctx.run_dir) / "plots" / "curve.png")
            plt.close(fig)
        return {}


def train(run_dir, data, sleep_rank=None, sleep_s=0.0, plot_step=None):
    """Train ``data`` in ``run_dir``; this rank's log lines."""
    lines = []
    callbacks = [SleepOnRank(sleep_rank, sleep_s)] if sleep_rank is not None else []
    callbacks += [DrawPlot(plot_step)] if plot_step is not None else []
    Trainer(from_dict(RunConfig, data), Path(run_dir), callbacks=callbacks, log=lines.append).run()
    return [str(line) for line in lines]


def train_without_network(run_dir, data, plot_step=None):
    """:func:`train` with W&B's own files (cache, settings) in the run directory and its error reports
    off: an offline run touches nothing outside it."""
    import os

    names = ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ERROR_REPORTING")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(Path(run_dir) / "wandb-home") for name in names[:3]})
    os.environ["WANDB_ERROR_REPORTING"] = "false"
    try:
        return train(run_dir, data, plot_step=plot_step)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- W&B's offline transaction log (LevelDB log format: 32 KiB blocks of checksummed, typed chunks) ---


def _wandb_records(path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, header = 32768, 7
    pos, pending = header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + header : pos + header + length]
        pos += header + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            yield pending
            pending = b""


def wandb_offline_run(run_dir):
    """``(history rows by step, run ids, run configs)`` of every offline W&B run in the run directory."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows, ids, configs = {}, [], []
    for path in sorted(Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        for raw in _wandb_records(path):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                rows.setdefault(row["_step"], {}).update(row)
            elif kind == "run":
                ids.append(record.run.run_id)
                configs.append({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return rows, ids, configs


def test_an_offline_wandb_run_holds_the_scalars_of_metrics_jsonl_and_resumes_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    data = merge(
        TINY,
        {
            "train": {"steps": 3, "eval_interval": 2, "eval_steps": 1},
            "logging": {"norm_interval": 1, "wandb": {"mode": "offline", "project": "tests", "tags": ["ci"]}},
        },
    )
    run_distributed(train_without_network, 1, None, run_dir=str(tmp_path), data=data, plot_step=2)
    resumed = merge(data, {"train": {"steps": 5}})
    run_distributed(train_without_network, 1, None, run_dir=str(tmp_path), data=resumed)

    records = read_metrics(tmp_path / "metrics.jsonl")
    rows, ids, configs = wandb_offline_run(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] == sorted(rows)
    for record in records:
        expected = scalars(record)
        assert "norm/layer_grad/1" in expected and ("val/loss" in expected) == (record["step"] % 2 == 0)
        logged = {k: v for k, v in rows[record["step"]].items() if not k.startswith(("_", "plots/"))}
        assert logged == expected, f"step {record['step']}"
    # The plot when it appeared (again at a resumed run's first record: a new process cannot know).
    assert [s for s, row in sorted(rows.items()) if "plots/curve/_type" in row] == [2, 4]
    assert rows[2]["plots/curve/_type"] == "image-file" and rows[2]["plots/curve/path"].endswith(".png")
    assert len(ids) == 2 and len(set(ids)) == 1, "the resumed run continues the same W&B run"
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == ids[0]
    assert configs[0]["model"]["hidden_size"] == TINY["model"]["hidden_size"]
    assert configs[0]["logging"]["wandb"]["mode"] == "offline"
    assert not any(k.startswith(("time/", "slow_rank/")) for k in records[0]), "off by default"


def test_the_profiler_window_writes_a_trace_per_rank_with_the_named_regions(tmp_path):
    data = merge(
        EVERY_CAPABILITY,
        {
            "train": {"steps": 3, "eval_interval": 0},
            "hybrid_attention": {"mask_learning_steps": 2},
            "logging": {"tensorboard": False, "profile": {"start_step": 2, "steps": 1, "ranks": [0, 1]}},
        },
    )
    lines = run_distributed(train, 2, None, run_dir=str(tmp_path), data=data)
    for rank in (0, 1):
        trace = tmp_path / "profile" / f"rank{rank}.2.pt.trace.json"
        assert any(str(trace) in line for line in lines[rank])
        names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
        for region in (
            "consa/HybridCoreAttention",
            "consa/gates",  # the gates' sampling in mask learning (step 2 of 2)
            "sgt/LoopedTransformerLayer",
            "moe/ElasticRouter",
            "MoELayer.dispatch",
            "MoELayer.combine",
        ):
            assert region in names, f"rank {rank}: no {region} region in the trace"
        assert "aten::mm" in names or "aten::matmul" in names
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == [
        "rank0.2.pt.trace.json",
        "rank1.2.pt.trace.json",
    ]


def test_the_timer_breakdown_adds_up_to_the_step_time(tmp_path):
    """Every rank sleeps 400 ms in a callback before each step: the breakdown must put that time under
    ``callbacks`` and, with the tiny model's own phases, account for the step within 10% (the sleep
    keeps the step long against the scheduling noise of a shared machine, which the few milliseconds
    of untimed glue of a tiny model's step could otherwise exceed)."""
    data = merge(TINY, {"train": {"steps": 6}, "logging": {"timers": 2, "log_interval": 2}})
    lines = run_distributed(train, 2, None, run_dir=str(tmp_path), data=data, sleep_rank=-1, sleep_s=0.4)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert r["time/callbacks"] >= 400.0, r  # milliseconds: the sleep is attributed to the callbacks
        parts = sum(r[f"time/{k}"] for k in ("data", "forward_backward", "optimizer", "loss_reduce", "callbacks"))
        assert parts >= 0.9 * r["time/step"], r  # the phases account for the step
        # Each phase is its slowest rank's: in the first interval (step 1's one-time work) one rank's
        # wait lands in another phase than the other rank's work, and the sum counts both; once the
        # ranks run in step, it stays within 10% of the step.
        if r["step"] > 2:
            assert parts <= 1.1 * r["time/step"], r
        assert r["time/grad_sync"] < r["time/forward_backward"]
        # Forward and backward lie inside forward-backward on every rank; their slowest ranks may differ.
        assert r["time/forward"] + r["time/backward"] <= 1.1 * r["time/forward_backward"], r
        assert all(r[f"time/{k}"] > 0 for k in ("data", "forward_backward", "grad_sync", "optimizer", "forward"))
    assert sum(" | time ms step " in line for line in lines[0]) == 3


def test_the_slow_rank_warning_names_the_rank_that_sleeps(tmp_path):
    data = merge(TINY, {"train": {"steps": 4}, "logging": {"log_interval": 2, "slow_rank_threshold": 1.5}})
    lines = run_distributed(train, 2, None, run_dir=str(tmp_path), data=data, sleep_rank=1, sleep_s=0.25)
    warnings = [line for line in lines[0] if line.startswith("WARNING: rank")]
    assert len(warnings) == 2 and all(w.startswith("WARNING: rank 1 is slow") for w in warnings), lines[0]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["slow_rank/rank"] for r in records] == [1, 1]
    assert all(r["slow_rank/ratio"] > 1.5 for r in records)


def test_per_layer_norms_agree_across_tensor_parallel_layouts(tmp_path):
    base = merge(TINY, {"train": {"steps": 2}, "logging": {"norm_interval": 1}})
    run_distributed(train, 1, None, run_dir=str(tmp_path / "tp1"), data=base)
    run_distributed(train, 2, None, run_dir=str(tmp_path / "tp2"), data=merge(base, {"parallel": {"tensor": 2}}))
    one, two = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("tp1", "tp2"))
    for a, b in zip(one, two):
        assert len(a["norm/layer_grad"]) == len(a["norm/layer_param"]) == TINY["model"]["num_layers"]
        assert b["norm/layer_param"] == pytest.approx(a["norm/layer_param"], rel=1e-5)
        assert b["norm/layer_grad"] == pytest.approx(a["norm/layer_grad"], rel=1e-4)
        assert b["norm/param"] == pytest.approx(a["norm/param"], rel=1e-5)
        layers = math.sqrt(sum(v * v for v in a["norm/layer_param"]))
        assert layers < a["norm/param"], "the embeddings and output layer count in the whole model's norm"
