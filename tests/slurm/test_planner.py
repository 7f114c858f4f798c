"""The launch planner: rank coordinates and groups against Megatron-Core's own, node-crossing
warnings, the memory estimate, and the checks of sizes and node counts against the allocation."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from megatron_ext.config import ConfigError
from megatron_ext.launch.layout import GROUP_KINDS, Layout
from megatron_ext.launch.memory import ParamInventory, estimate_memory, layer_activation_bytes
from megatron_ext.launch.planner import check_allocation, format_plan, format_plan_summary, make_plan, sbatch_command
from megatron_ext.run import load_config
from tests.slurm.cluster import REPO

# (TP, PP, CP, EP, ETP, world): dense, MoE with EP inside TP x DP, CP, expert TP != TP.
LAYOUTS = [(2, 2, 1, 4, 1, 16), (1, 2, 1, 2, 1, 8), (2, 1, 2, 1, 2, 8), (4, 2, 1, 2, 2, 32), (2, 2, 1, 1, 2, 8)]
MEGATRON_TOKENS = {  # our group kind -> (Megatron rank generator, its token)
    "tp": ("dense", "tp"),
    "cp": ("dense", "cp"),
    "dp": ("dense", "dp"),
    "pp": ("dense", "pp"),
    "dp-cp": ("dense", "dp-cp"),
    "tp-pp": ("dense", "tp-pp"),
    "ep": ("expert", "ep"),
    "etp": ("expert", "tp"),
    "edp": ("expert", "dp"),
    "etp-ep": ("expert", "tp-ep"),
}


def layout_of(tp, pp, cp, ep, etp, world, gpus_per_node=8):
    return Layout(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, world=world, gpus_per_node=gpus_per_node)


@pytest.mark.parametrize("sizes", LAYOUTS, ids=lambda s: "tp{}-pp{}-cp{}-ep{}-etp{}-w{}".format(*s))
def test_groups_match_megatron_rank_generator(sizes):
    from megatron.core.parallel_state import RankGenerator

    tp, pp, cp, ep, etp, world = sizes
    lay = layout_of(*sizes)
    generators = {
        "dense": RankGenerator(tp=tp, ep=1, dp=lay.dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp"),
        "expert": RankGenerator(tp=etp, ep=ep, dp=lay.edp, pp=pp, cp=1, order="tp-cp-ep-dp-pp"),
    }
    assert set(MEGATRON_TOKENS) == set(GROUP_KINDS)
    for kind, (generator, token) in MEGATRON_TOKENS.items():
        assert lay.groups(kind) == generators[generator].get_ranks(token), kind


def test_coordinates_and_groups_match_megatron_parallel_state_on_a_fake_world():
    """Megatron's initialize_model_parallel, run for every rank of each layout on torch's fake
    backend, gives every rank the coordinates and groups the planner prints."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.slurm.fake_world", json.dumps(LAYOUTS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    views = json.loads(proc.stdout)
    for sizes, view in zip(LAYOUTS, views, strict=True):
        lay = layout_of(*sizes)
        groups_of = {kind: {r: g for g in lay.groups(kind) for r in g} for kind in GROUP_KINDS}
        for c in lay.coordinates():
            megatron = view[str(c.rank)]
            ours = {"tp": c.tp, "pp": c.pp, "cp": c.cp, "dp": c.dp, "ep": c.ep, "etp": c.etp, "edp": c.edp}
            assert ours == megatron["coords"], (sizes, c.rank)
            assert {kind: groups_of[kind][c.rank] for kind in GROUP_KINDS} == megatron["groups"], (sizes, c.rank)


def test_node_crossing_warnings():
    assert layout_of(2, 2, 1, 4, 1, 16).node_warnings() == []
    tp_wide = layout_of(16, 1, 1, 1, 16, 32)  # TP 16 on nodes of 8 GPUs
    warnings = tp_wide.node_warnings()
    assert len(warnings) == 2 and warnings[0].startswith("TP groups cross node boundaries (2 of 2")
    assert warnings[1].startswith("ETP groups cross")
    ep_wide = layout_of(1, 1, 1, 16, 1, 32)
    assert [w.split(" ")[0] for w in ep_wide.node_warnings()] == ["EP"]
    assert f"e.g. ranks {list(range(16))} on nodes [0, 1]" in ep_wide.node_warnings()[0]
    small_nodes = layout_of(4, 1, 1, 1, 4, 8, gpus_per_node=2)
    assert small_nodes.cross_node_groups("tp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert small_nodes.cross_node_groups("pp") == []  # PP = 1: single-rank groups


def dense_config(**parallel):
    cfg = load_config(REPO / "configs" / "qwen3_1p7b.yaml")
    return replace(cfg, parallel=replace(cfg.parallel, **parallel))


def dense_inventory(layers=28, per_layer_tp=48_000_000, per_layer_norms=4_000, embedding=300_000_000):
    return ParamInventory(
        num_layers=layers,
        layers=[{"tp": per_layer_tp, "replicated": per_layer_norms}] * layers,
        first_stage={"tp": embedding},
        last_stage={"replicated": 2048},
        tied_embedding=embedding,
    )


def test_memory_estimate_follows_the_sharding():
    inv = dense_inventory()
    world = 64
    (single,) = estimate_memory(dense_config(), inv, world)
    assert single.params == inv.total
    assert single.weights == 2 * inv.total and single.gradients == 4 * inv.total  # bf16 weights, fp32 grads
    assert single.optimizer == pytest.approx(12 * inv.total / world)  # distributed optimizer over DP = 64

    first, last = estimate_memory(dense_config(tensor=2, pipeline=2), inv, world)
    per_stage_layers = 14 * 48_000_000 / 2 + 14 * 4_000
    assert first.params == int(per_stage_layers + 300_000_000 / 2)
    assert last.params == int(per_stage_layers + 2048 + 300_000_000 / 2)  # tied embedding copy
    assert first.optimizer == pytest.approx(12 * first.params / 16, rel=1e-6)  # DP = 64 / 4


def local_attention(cfg):
    """``cfg`` with Megatron's unfused attention, the one that stores the score matrix."""
    return replace(cfg, model=replace(cfg.model, attention_backend="local"))


def test_the_score_matrix_counts_only_where_the_attention_stores_it():
    cfg = dense_config()
    s, b, h, a = 8192, 1, 2048, 16
    assert cfg.model.attention_backend == "sdpa"  # fused: one log-sum-exp per row, no s x s matrix
    assert layer_activation_bytes(cfg) == layer_activation_bytes(cfg, "selective") == s * b * h * 34
    assert layer_activation_bytes(local_attention(cfg)) == s * b * h * (34 + 5 * a * s / h)
    consa = load_config(REPO / "configs" / "consa_qwen3_0p6b.yaml")  # hybrid layers: their own kernels
    assert layer_activation_bytes(local_attention(consa)) == layer_activation_bytes(consa, "selective")


def test_activation_estimate_is_korthikanti_et_al():
    cfg = local_attention(dense_config())
    s, b, h, a, layers = 8192, 1, 2048, 16, 28
    assert layer_activation_bytes(cfg) == s * b * h * (34 + 5 * a * s / h)
    assert layer_activation_bytes(cfg, "selective") == s * b * h * 34
    assert layer_activation_bytes(cfg, "full") == 2 * s * b * h
    tp2 = local_attention(dense_config(tensor=2))
    assert layer_activation_bytes(tp2) == pytest.approx(s * b * h * (10 + 24 / 2 + 5 * a * s / (h * 2)))
    tp2_sp = local_attention(dense_config(tensor=2, sequence_parallel=True))
    assert layer_activation_bytes(tp2_sp) == pytest.approx(s * b * h * (34 + 5 * a * s / h) / 2)

    inv = dense_inventory()
    (pp1,) = estimate_memory(cfg, inv, 64)
    logits = 4 * s * b * 151936 / 1
    assert pp1.activations == pytest.approx(layers * layer_activation_bytes(cfg) + logits)
    first, last = estimate_memory(local_attention(dense_config(pipeline=2)), inv, 64)  # 1F1B: 2 micro-batches
    assert first.activations == pytest.approx(2 * (layers // 2) * layer_activation_bytes(cfg))
    assert last.activations == pytest.approx((layers // 2) * layer_activation_bytes(cfg) + logits)
    peaks = [
        max(m.total for m in estimate_memory(replace(cfg, train=replace(cfg.train, recompute=mode)), inv, 64))
        for mode in ("none", "selective", "full")
    ]
    assert peaks[0] > peaks[1] > peaks[2]


def _inventory_and_count(config_path):
    from megatron_ext.launch.memory import parameter_inventory
    from megatron_ext.run.param_count import count_parameters

    cfg = load_config(config_path)
    inv = parameter_inventory(cfg)
    experts = sum(layer.get("expert", 0) for layer in inv.layers)
    return inv.total, experts, count_parameters(cfg).as_dict()


def test_meta_inventory_agrees_with_the_parameter_count():
    from megatron_ext.testing.distributed import run_distributed

    smoke = str(REPO / "configs" / "smoke.yaml")
    total, experts, report = run_distributed(_inventory_and_count, 1, config_path=smoke)[0]
    assert total == report["total"] and experts == report["routed_experts"] > 0


def test_plan_warns_only_about_groups_the_model_uses():
    plan = make_plan(dense_config(tensor=8), 2, 4, dense_inventory(), environ={})  # dense: no experts
    assert [w.split(" ")[0] for w in plan.warnings] == ["TP"]
    report = format_plan(plan)
    assert "TP: 1 group(s) of 8, 1 cross nodes" in report and "EP" not in report
    assert "peak: stage 0" in report


def moe_config(**parallel):
    cfg = load_config(REPO / "configs" / "ultra_sparse_moe.yaml")  # TP 1, PP 4, EP 16
    return replace(cfg, parallel=replace(cfg.parallel, **parallel))


def moe_inventory(layers=32):
    return ParamInventory(
        num_layers=layers,
        layers=[{"tp": 30_000_000, "replicated": 4_000, "expert": 2_400_000_000}] * layers,
        first_stage={"tp": 300_000_000},
        last_stage={"replicated": 2048},
        tied_embedding=300_000_000,
    )


def test_the_summary_of_a_1024_gpu_layout_is_short():
    plan = make_plan(moe_config(), 128, 8, moe_inventory(), environ={})
    full, summary = format_plan(plan).splitlines(), format_plan_summary(plan).splitlines()
    print("\n".join(summary))
    assert len(full) > 1000 and len(summary) < 60
    assert "ultra_sparse_moe: 128 node(s) x 8 GPU(s) = 1024 ranks, 78.06B parameters" in summary
    assert "  dense layers:  TP 1 x CP 1 x DP 256 x PP 4" in summary
    assert "  expert layers: ETP 1 x EP 16 x EDP 16 x PP 4 (768 experts, 48 per EP rank)" in summary
    assert "  TP: 1024 group(s) of 1, all inside a node" in summary
    assert "  DP: 4 group(s) of 256, 4 cross nodes" in summary
    assert "  EP (token all-to-all): 64 group(s) of 16, 64 cross nodes" in summary
    assert plan.warnings and all(f"  - {w}" in summary for w in plan.warnings)
    assert any(line.startswith("  peak: stage ") for line in summary)
    # the same lines as the full report, without its rank and group listings
    assert [line for line in summary if line not in full] == [
        "Groups (node = rank // 8; the ranks of each: run without --summary)"
    ]
    assert len(format_plan_summary(make_plan(moe_config(), 32, 8, moe_inventory(), environ={})).splitlines()) == len(
        summary
    )  # independent of the GPU count


def test_the_cross_node_expert_warning_names_the_fix():
    def ep_warnings(nodes, **parallel):
        plan = make_plan(moe_config(**parallel), nodes, 8, moe_inventory(), environ={})
        return [w for w in plan.warnings if w.startswith("EP groups cross")]

    # TP 2 without parallel.expert_tensor: ETP = 2 strides each EP group of 8 over 16 ranks, two nodes
    tp2 = {"tensor": 2, "pipeline": 1, "expert": 8, "sequence_parallel": True}
    (warning,) = ep_warnings(4, **tp2)
    assert (
        "each EP group spans ETP x EP = 2 x 8 = 16 consecutive ranks (parallel.expert_tensor is unset, so "
        "ETP follows parallel.tensor=2): set parallel.expert_tensor=1 (ETP x EP = 8 ranks), or "
        "parallel.expert=4 (ETP x EP = 8 ranks) to keep them inside a node of 8 GPUs" in warning
    ), warning
    assert ep_warnings(4, **tp2, expert_tensor=1) == []
    assert ep_warnings(4, **{**tp2, "expert": 4}) == []
    (warning,) = ep_warnings(128)  # EP 16 on nodes of 8
    assert warning.endswith(
        "each EP group spans ETP x EP = 1 x 16 = 16 consecutive ranks: set "
        "parallel.expert=8 (ETP x EP = 8 ranks) to keep them inside a node of 8 GPUs"
    ), warning
    assert ep_warnings(128, expert=8) == []
    (warning,) = ep_warnings(4, **{**tp2, "expert": 16})  # neither field alone fits EP 16; both do
    assert "set parallel.expert=4 (ETP x EP = 8 ranks), or parallel.expert_tensor=1 with parallel.expert=8" in warning
    assert ep_warnings(4, **{**tp2, "expert": 8}, expert_tensor=1) == []


def test_sizes_that_do_not_fit_the_allocation():
    cfg = dense_config(tensor=3)
    with pytest.raises(ConfigError) as err:
        check_allocation(cfg, 8, 8, environ={})
    text = str(err.value)
    assert "on 8 node(s) x 8 GPU(s) = 64 ranks: world size 64 is not divisible" in text
    assert "model.num_attention_heads=16 is not divisible by parallel.tensor=3" in text
    check_allocation(dense_config(tensor=2, pipeline=2), 8, 8, environ={})


def test_node_count_must_agree_with_slurm():
    cfg = dense_config(tensor=2)
    with pytest.raises(ConfigError, match=r"--nodes 8 disagrees with .*SLURM_JOB_NUM_NODES=2"):
        check_allocation(cfg, 8, 8, environ={"SLURM_JOB_NUM_NODES": "2"})
    with pytest.raises(ConfigError, match=r"--gpus-per-node 8 disagrees with .*SLURM_GPUS_ON_NODE=4"):
        check_allocation(cfg, 2, 8, environ={"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"})
    check_allocation(cfg, 2, 8, environ={"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"})


def test_sbatch_command():
    command = sbatch_command("configs/smoke.yaml", ["parallel.tensor=2", "train.lr=1e-3"], 2, 8, job_name="smoke")
    assert command == (
        "mkdir -p logs && sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --job-name=smoke "
        "--export=ALL,NODES=2 slurm/train_gpu.sbatch --config configs/smoke.yaml "
        "--set parallel.tensor=2 --set train.lr=1e-3"
    )


def plan_cli(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        [sys.executable, "-m", "pretrain.plan", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_paper_scale_dry_run():
    proc = plan_cli(
        "--config",
        "configs/qwen3_1p7b.yaml",
        "--nodes",
        "8",
        "--gpus-per-node",
        "8",
        "--set",
        "parallel.tensor=2",
        "--set",
        "parallel.pipeline=2",
        "--emit-sbatch",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    print(out[:600], "\n...\n", out[-1200:])
    assert "qwen3_1p7b: 8 node(s) x 8 GPU(s) = 64 ranks, 1.72B parameters" in out
    assert "dense layers:  TP 2 x CP 1 x DP 16 x PP 2" in out
    assert "    63     7 |   1   0  15   1" in out  # the last rank: TP 1, DP 15, PP 1 on node 7
    assert "TP: 32 group(s) of 2, all inside a node" in out
    assert "PP: 32 group(s) of 2, 32 cross nodes" in out
    assert "sbatch --nodes=8 --ntasks-per-node=1 --gpus-per-node=8" in out


def test_summary_cli_at_1024_gpus():
    proc = plan_cli(
        "--config",
        "configs/qwen3_1p7b.yaml",
        "--nodes",
        "128",
        "--gpus-per-node",
        "8",
        "--set",
        "train.global_batch_size=1024",
        "--summary",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) < 60, proc.stdout
    assert "  dense layers:  TP 1 x CP 1 x DP 1024 x PP 1" in lines
    assert "  DP: 1 group(s) of 1024, 1 cross nodes" in lines
    # SDPA keeps no score matrix: 28 layers of 34 sbh bytes, not the 5as/h term that made this 10x larger
    assert (
        "  peak: stage 0, 29.14 GiB of 80 GiB; with train.recompute = none: 29.14, selective: 29.14, full: 15.68"
        in lines
    )
    assert "Warnings: none" in lines


def test_the_consa_recipe_fits_where_its_kernels_store_no_scores():
    proc = plan_cli("--config", "configs/consa_qwen3_0p6b.yaml", "--nodes", "4", "--gpus-per-node", "8", "--summary")
    assert proc.returncode == 0, proc.stderr
    assert "  peak: stage 0, 15.61 GiB of 80 GiB" in proc.stdout, proc.stdout


@pytest.mark.parametrize("size,params", [("0p6b", "0.60B"), ("1p7b", "1.72B")])
def test_consa_recipes_plan_at_paper_scale(size, params):
    proc = plan_cli(
        "--config",
        f"configs/consa_qwen3_{size}.yaml",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--set",
        "parallel.tensor=2",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"consa_qwen3_{size}: 2 node(s) x 8 GPU(s) = 16 ranks, {params} parameters" in proc.stdout


def test_the_sgt_recipe_plans_and_checks_its_data_where_it_is(tmp_path):
    """configs/sgt_olmo_300m.yaml (the released 300M shape): away from its data the plan says the data
    checks wait for the job; with data here they run (and a prefix that does not exist is refused)."""
    away = plan_cli("--config", "configs/sgt_olmo_300m.yaml", "--nodes", "4", "--gpus-per-node", "8", "--summary")
    assert away.returncode == 0, away.stderr
    assert "sgt_olmo_300m: 4 node(s) x 8 GPU(s) = 32 ranks, 0.37B parameters" in away.stdout
    assert "is not on this machine: its checks run when the job starts" in away.stdout
    from megatron_ext.data.preprocess import preprocess

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a document"}\n' * 20)
    preprocess([docs], tmp_path / "docs", "bytes", progress=False)
    here = ["--set", f"data.paths=[{tmp_path / 'docs'}]", "--set", "data.tokenizer=bytes"]
    local = plan_cli(
        "--config", "configs/sgt_olmo_300m.yaml", "--nodes", "4", "--gpus-per-node", "8", "--summary", *here
    )
    assert local.returncode == 0, local.stderr
    assert "not on this machine" not in local.stdout
    wrong = plan_cli(
        "--config", "configs/sgt_olmo_300m.yaml", "--nodes", "4", "--gpus-per-node", "8",
        "--set", f"data.paths=[{tmp_path / 'nothing'}]", "--set", "data.tokenizer=bytes",
    )  # fmt: skip
    assert "not on this machine" in wrong.stdout  # a prefix that exists nowhere is the job's to report


def test_planner_cli_rejects_sizes_that_do_not_fit():
    proc = plan_cli(
        "--config", "configs/qwen3_1p7b.yaml", "--nodes", "1", "--gpus-per-node", "6", "--set", "parallel.tensor=4"
    )
    assert proc.returncode == 2
    assert "world size 6 is not divisible by parallel.tensor * parallel.pipeline" in proc.stderr
