"""Sub-model extraction: the extracted model computes what the full model does under the same
sub-network (layers skipped, experts restricted, top-k reduced)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from megatron_ext.config import from_dict
from megatron_ext.data.synthetic import SyntheticMotifDataset, collate
from megatron_ext.moe import elastic
from megatron_ext.moe.elastic import SubNetwork
from megatron_ext.parallel import ParallelSizes, initialize_parallel_state
from megatron_ext.run import RunConfig, load_config
from megatron_ext.run.builder import build_model, unsharded
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.capabilities import restore_capabilities
from megatron_ext.training.checkpoint import CheckpointManager
from megatron_ext.training.extract import extract_submodel
from megatron_ext.training.loop import Trainer
from megatron_ext.training.rundir import read_metrics
from tests.configs import TINY, merge

CONFIG = merge(
    TINY,
    {
        "model": {"num_layers": 4, "num_query_groups": None},
        "train": {"steps": 6},
        "moe": {"enabled": True, "num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 16, "first_k_dense": 1},
        "routing": {"expert_bias": True, "bias_update_rate": 0.01},
        "elastic": {"enabled": True},
    },
)
SUBNETWORKS = [
    SubNetwork((0, 1, 2, 3), (1, 2, 4, 6), 2),
    SubNetwork((0, 2, 3), None, 1),
    SubNetwork((0, 3), (0, 1, 2, 3, 4, 5), 1),
]


def mean_loss(model, batch):
    with torch.no_grad():
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return float(losses.float().mean())


def load_trained(cfg, run_dir, structure=True):
    """A run directory's latest checkpoint as a one-rank model, with its trained structure
    (``structure=False``: the weights alone, every attention head full)."""
    (model,) = build_model(cfg, cuda=False)
    manager = CheckpointManager(Path(run_dir) / "checkpoints", 1)
    common = manager.load(manager.latest(), [model], None, load_optimizer=False)
    if structure:
        restore_capabilities(cfg, [model], common, run_dir)
    model.eval()
    return model


def train_and_extract(run_dir, config=CONFIG):
    run_dir = Path(run_dir)
    Trainer(from_dict(RunConfig, copy.deepcopy(config)), run_dir, log=lambda line: None).run()
    initialize_parallel_state(ParallelSizes())  # the trainer tore its own down
    cfg = unsharded(load_config(run_dir / "config.yaml"))
    full = load_trained(cfg, run_dir)
    batch = collate([SyntheticMotifDataset(128, 16, 99, "valid")[i] for i in range(4)])
    results = [("full", mean_loss(full, batch), mean_loss(load_trained(cfg, run_dir, structure=False), batch))]
    for n, sub in enumerate(SUBNETWORKS):
        elastic.apply([full], sub)
        with_sub = mean_loss(full, batch)
        elastic.reset([full])
        out = run_dir.parent / f"sub{n}"
        extract_submodel(run_dir, out, sub)
        small = load_trained(load_config(out / "config.yaml"), out)
        params = sum(p.numel() for p in small.parameters())
        results.append((str(sub), with_sub, mean_loss(small, batch), params))
    return results


def check_extracted(results, label):
    print(f"[extract{label}] full model loss {results[0][1]:.6f} (weights alone, all heads full: {results[0][2]:.6f})")
    for name, with_sub, extracted, params in results[1:]:
        print(
            f"[extract{label}] {name}: full model with sub-network {with_sub:.6f}, extracted ({params} params) "
            f"{extracted:.6f}"
        )
        assert abs(with_sub - extracted) <= 1e-5 * abs(with_sub)
    assert len({round(r[1], 4) for r in results}) == len(results), "sub-networks must differ from each other"


def test_extracted_submodels_equal_full_model_with_that_subnetwork(tmp_path):
    check_extracted(run_distributed(train_and_extract, 1, None, run_dir=str(tmp_path / "run"))[0], "")


HYBRID = {
    **CONFIG,
    "hybrid_attention": {"enabled": True, "method": "consa", "window": 4, "target": 0.5, "mask_learning_steps": 3},
}


def test_hybrid_attention_submodels_keep_their_layers_allocation(tmp_path):
    """After binarization (step 3 of 6) the sub-model is a static hybrid with the kept layers' rows."""
    results = run_distributed(train_and_extract, 1, None, run_dir=str(tmp_path / "run"), config=HYBRID)[0]
    check_extracted(results, " hybrid")
    full = json.loads((tmp_path / "run" / "allocation.json").read_text())["layers"]
    for n, sub in enumerate(SUBNETWORKS):
        kept = json.loads((tmp_path / f"sub{n}" / "allocation.json").read_text())["layers"]
        assert [r["full_attention"] for r in kept] == [full[i]["full_attention"] for i in sub.layers]
        sub_config = load_config(tmp_path / f"sub{n}" / "config.yaml")
        assert sub_config.hybrid_attention.method == "static"
        # Its own later checkpoints resume their optimizer: the step-0 checkpoint records it has none.
        assert sub_config.checkpoint.load_optimizer
    # The allocation matters: the same weights with every head full attention compute another loss.
    trained, all_full = results[0][1], results[0][2]
    assert abs(trained - all_full) > 1e-4 * abs(trained), (trained, all_full)


EVERYTHING = {
    **HYBRID,
    "train": {**CONFIG["train"], "steps": 8},
    "looping": {
        "enabled": True,
        "first_selection_step": 2,
        "window": 2,
        "top_k_layers": 2,
        "max_selected_layers": 2,
        "num_keep_heads": 2,
    },
}


def test_submodels_of_a_model_with_every_capability_keep_their_loops(tmp_path):
    """Elastic MoE + hybrid attention + SGT loops: a sub-model loops the kept layers it looped."""
    results = run_distributed(train_and_extract, 1, None, run_dir=str(tmp_path / "run"), config=EVERYTHING)[0]
    check_extracted(results, " everything")
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["sgt/loop_depths"] == [0, 0, 1, 1], last["sgt/loop_depths"]  # grown deep to shallow
    assert last["consa/swa_fraction"] == 0.5


def extract_during_mask_learning(run_dir):
    config = {**HYBRID, "hybrid_attention": {**HYBRID["hybrid_attention"], "mask_learning_steps": 50}}
    Trainer(from_dict(RunConfig, copy.deepcopy(config)), Path(run_dir), log=lambda line: None).run()
    initialize_parallel_state(ParallelSizes())
    with pytest.raises(ValueError, match="before binarization.*after binarization"):
        extract_submodel(Path(run_dir), Path(run_dir).parent / "sub", SUBNETWORKS[0])


def test_extraction_refuses_a_run_still_learning_its_mask(tmp_path):
    run_distributed(extract_during_mask_learning, 1, None, run_dir=str(tmp_path / "run"))


def test_bad_subnetworks_are_refused():
    from megatron_ext.training.extract import check_subnetwork

    cfg = from_dict(RunConfig, copy.deepcopy(CONFIG))
    for sub, message in (
        (SubNetwork((0, 9), None, 2), "layers"),
        (SubNetwork((0,), (1, 1), 2), "experts"),
        (SubNetwork((0,), (3,), 2), "top-k 2 must be in"),
    ):
        with pytest.raises(ValueError, match=message):
            check_subnetwork(cfg, sub)
