"""Golden-value cases: short runs of the real trainer whose per-step figures are committed.

Each case is a run config (the smoke config with its schedule scaled down so that every method
event happens within the run, and tiny models at TP=2, PP=2 and EP=2 with every capability on).
``python -m tests.golden.regenerate`` rewrites ``golden_values.json``; ``test_golden.py`` runs the
cases again and asks for the same numbers, bit for bit. Non-compute changes (refactors) must keep
them; a compute change regenerates the file and says why the numbers moved.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, List

GOLDEN_FILE = Path(__file__).with_name("golden_values.json")
SMOKE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"

VOLATILE_KEYS = ("tokens_per_sec", "mem/peak_gib", "tflops_per_rank", "mfu")
"""Metrics that measure the machine, not the computation: not compared."""

# Every capability on: ConSA mask learning then the static hybrid, elastic MoE with expert bias,
# SGT growth (select, fade, freeze).
_SCHEDULE = {
    "hybrid_attention": {"mask_learning_steps": 8, "target_warmup_steps": 3},
    "looping": {"first_selection_step": 4, "window": 3, "max_selected_layers": 2},
    "logging": {"log_interval": 1, "tensorboard": False},
    "checkpoint": {"save_interval": 0, "save_at_end": False},
}

_TINY = {
    "name": "golden",
    "model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 64, "vocab_size": 128, "qk_layernorm": True},
    "data": {"kind": "synthetic", "seq_length": 32},
    "train": {"micro_batch_size": 1, "global_batch_size": 4, "steps": 12, "lr": 1.0e-2, "warmup_steps": 1,
              "eval_interval": 6, "eval_steps": 1},
    "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32,
            "shared_expert_ffn_hidden_size": 32, "first_k_dense": 1},
    "routing": {"expert_bias": True, "bias_update_rate": 1.0e-2},
    "elastic": {"enabled": True, "depth_full_prob": 0.5, "width_full_prob": 0.5, "topk_default_prob": 0.5},
    "hybrid_attention": {"enabled": True, "method": "consa", "granularity": "kv_head", "window": 8,
                         "target": 0.5, "constraint": "per_layer"},
    "looping": {"enabled": True, "method": "sgt", "top_k_layers": 3, "max_loop_depth": 1, "num_keep_heads": 2},
}


def _merge(base: dict, *updates: dict) -> dict:
    out = copy.deepcopy(base)
    for update in updates:
        for section, values in update.items():
            if isinstance(values, dict):
                out.setdefault(section, {}).update(values)
            else:
                out[section] = values
    return out


def case_configs() -> Dict[str, dict]:
    """``{case: (config dict)}``; every case runs on two gloo ranks."""
    import yaml

    smoke = yaml.safe_load(SMOKE_CONFIG.read_text())
    return {
        # train.min_lr: the smoke config's value when these were recorded (its own schedule is longer now)
        "smoke": _merge(smoke, _SCHEDULE, {"train": {"steps": 16, "eval_interval": 8, "min_lr": 3.0e-4},
                                           "hybrid_attention": {"mask_learning_start_step": 0,
                                                                "mask_learning_steps": 10}}),
        "tp2": _merge(_TINY, _SCHEDULE, {"parallel": {"tensor": 2, "sequence_parallel": True}}),
        "pp2": _merge(_TINY, _SCHEDULE, {"parallel": {"pipeline": 2}}),
        "ep2": _merge(_TINY, _SCHEDULE, {"parallel": {"expert": 2}}),
    }


def run_case(config: dict, run_dir: str) -> List[dict]:
    """Train ``config`` in ``run_dir`` (on the ranks of the calling job); the logged records
    without the volatile keys."""
    from megatron_ext.config import from_dict
    from megatron_ext.run import RunConfig
    from megatron_ext.training.loop import Trainer
    from megatron_ext.training.rundir import read_metrics

    Trainer(from_dict(RunConfig, copy.deepcopy(config)), Path(run_dir), log=lambda line: None).run()
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in VOLATILE_KEYS} for r in records]


def load_golden() -> Dict[str, List[dict]]:
    return json.loads(GOLDEN_FILE.read_text())
