"""Multi-token prediction (Megatron-Core's MTP block): the same losses and MTP losses at TP=2 and
PP=2 (MTP on the last stage) as on one rank from the same weights, with MoE, hybrid attention and
elastic depth on; the weight follows its schedule; ``loss`` stays the next-token loss."""

from pathlib import Path

from megatron_ext.config import from_dict
from megatron_ext.run import RunConfig
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

BASE = merge(
    TINY,
    {
        "model": {"num_layers": 4, "mtp_num_layers": 1},
        "train": {"steps": 3, "lr": 1e-2, "mtp_weight": 0.3, "mtp_weight_final": 0.1},
        "moe": {"enabled": True, "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 32, "first_k_dense": 1},
        "hybrid_attention": {"enabled": True, "method": "rule_head", "window": 4, "target": 0.5},
        "elastic": {"enabled": True, "width_full_prob": 1.0, "topk_default_prob": 1.0},
    },
)
KEYS = ("loss", "mtp/loss_1")


def train(run_dir, overrides):
    Trainer(from_dict(RunConfig, merge(BASE, overrides)), Path(run_dir), log=lambda line: None).run()
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def test_mtp_losses_agree_across_tp_and_pp_from_the_same_weights(tmp_path):
    run_distributed(train, 1, None, run_dir=str(tmp_path / "source"), overrides={"train": {"steps": 1}})
    start = {"train": {"init_from": str(tmp_path / "source")}}
    one = run_distributed(train, 1, None, run_dir=str(tmp_path / "one"), overrides=start)[0]
    tp2 = run_distributed(
        train,
        2,
        None,
        run_dir=str(tmp_path / "tp2"),
        overrides={**start, "parallel": {"tensor": 2, "sequence_parallel": True}},
    )[0]
    pp2 = run_distributed(
        train, 2, None, run_dir=str(tmp_path / "pp2"), overrides={**start, "parallel": {"pipeline": 2}}
    )[0]
    print(
        "[mtp] one rank:", [(r["step"], round(r["loss"], 5), round(r["mtp/loss_1"], 5), r["mtp/weight"]) for r in one]
    )
    for name, other in (("TP=2", tp2), ("PP=2", pp2)):
        for a, b in zip(one, other):
            for key in KEYS:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (name, a["step"], key, a[key], b[key])
    assert [r["mtp/weight"] for r in one] == [0.3, 0.2, 0.1]


def test_the_mtp_weight_changes_the_gradient_not_the_logged_loss(tmp_path):
    runs = {
        w: run_distributed(
            train,
            1,
            None,
            run_dir=str(tmp_path / str(w)),
            overrides={"train": {"mtp_weight": w, "mtp_weight_final": None}},
        )[0]
        for w in (0.0, 1.0)
    }
    assert runs[0.0][0]["loss"] == runs[1.0][0]["loss"]  # step 1: the same model, the next-token loss only
    assert runs[0.0][-1]["loss"] != runs[1.0][-1]["loss"]  # the MTP loss reached the weights
