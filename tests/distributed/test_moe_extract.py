"""Sub-model extraction: the extracted model computes what the full model does under the same
sub-network (layers skipped, experts restricted, top-k reduced)."""

import copy
from pathlib import Path

import pytest
import torch

from megatron_ext.config import RunConfig, from_dict, load_config
from megatron_ext.data.synthetic import SyntheticMotifDataset, collate
from megatron_ext.models.builder import build_model
from megatron_ext.moe import elastic
from megatron_ext.moe.elastic import SubNetwork
from megatron_ext.moe.extract import extract_submodel, unsharded
from megatron_ext.parallel import ParallelSizes, initialize_parallel_state
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.checkpoint import CheckpointManager
from megatron_ext.training.loop import Trainer

CONFIG = {
    "model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
              "vocab_size": 128},
    "data": {"seq_length": 16},
    "train": {"micro_batch_size": 2, "global_batch_size": 4, "steps": 6},
    "logging": {"tensorboard": False},
    "moe": {"enabled": True, "num_experts": 8, "top_k": 2, "expert_ffn_hidden_size": 16, "first_k_dense": 1},
    "routing": {"expert_bias": True, "bias_update_rate": 0.01},
    "elastic": {"enabled": True},
}
SUBNETWORKS = [SubNetwork((0, 1, 2, 3), (1, 2, 4, 6), 2), SubNetwork((0, 2, 3), None, 1),
               SubNetwork((0, 3), (0, 1, 2, 3, 4, 5), 1)]


def mean_loss(model, batch):
    with torch.no_grad():
        losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return float(losses.float().mean())


def train_and_extract(run_dir):
    run_dir = Path(run_dir)
    Trainer(from_dict(RunConfig, copy.deepcopy(CONFIG)), run_dir, log=lambda line: None).run()
    initialize_parallel_state(ParallelSizes())  # the trainer tore its own down
    cfg = load_config(run_dir / "config.yaml")
    (full,) = build_model(unsharded(cfg), cuda=False)
    CheckpointManager(run_dir / "checkpoints", 1).load(CheckpointManager(run_dir / "checkpoints", 1).latest(),
                                                        [full], None, load_optimizer=False)
    full.eval()
    batch = collate([SyntheticMotifDataset(128, 16, 99, "valid")[i] for i in range(4)])
    results = [("full", mean_loss(full, batch), None)]
    for n, sub in enumerate(SUBNETWORKS):
        elastic.apply([full], sub)
        with_sub = mean_loss(full, batch)
        elastic.reset([full])
        out = run_dir.parent / f"sub{n}"
        extract_submodel(run_dir, out, sub)
        small_cfg = load_config(out / "config.yaml")
        (small,) = build_model(small_cfg, cuda=False)
        manager = CheckpointManager(out / "checkpoints", 1)
        manager.load(manager.latest(), [small], None, load_optimizer=False)
        small.eval()
        params = sum(p.numel() for p in small.parameters())
        results.append((str(sub), with_sub, mean_loss(small, batch), params))
    return results


def test_extracted_submodels_equal_full_model_with_that_subnetwork(tmp_path):
    results = run_distributed(train_and_extract, 1, None, run_dir=str(tmp_path / "run"))[0]
    print(f"[extract] full model loss {results[0][1]:.6f}")
    for name, with_sub, extracted, params in results[1:]:
        print(f"[extract] {name}: full model with sub-network {with_sub:.6f}, extracted ({params} params) "
              f"{extracted:.6f}")
        assert abs(with_sub - extracted) <= 1e-5 * abs(with_sub)
    assert len({round(r[1], 4) for r in results}) == len(results), "sub-networks must differ from each other"


def test_bad_subnetworks_are_refused():
    from megatron_ext.moe.extract import check_subnetwork

    cfg = from_dict(RunConfig, copy.deepcopy(CONFIG))
    for sub, message in ((SubNetwork((0, 9), None, 2), "layers"), (SubNetwork((0,), (1, 1), 2), "experts"),
                         (SubNetwork((0,), (3,), 2), "top-k 2 must be in")):
        with pytest.raises(ValueError, match=message):
            check_subnetwork(cfg, sub)
