"""A checkpoint loads into a model with module extra states it lacks (Transformer Engine's modules keep
their FP8 scaling history there; a checkpoint of the local backend has none for TE's attention or
norms): those start afresh, every weight loads, and a missing weight is still an error."""

from pathlib import Path

import pytest
import torch

from megatron_ext.config import from_dict
from megatron_ext.models.attention import SDPACoreAttention
from megatron_ext.optim import build_optimizer
from megatron_ext.parallel import full_named_tensors
from megatron_ext.run import RunConfig
from megatron_ext.run.builder import build_model
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training import checkpoint
from megatron_ext.training.ddp import wrap_with_ddp
from megatron_ext.training.loop import optimizer_config
from tests.configs import TINY

# The tiny model with one KV head per query head: only the model and its optimizer are built.
CONFIG = {"model": {**TINY["model"], "num_query_groups": None}, "data": dict(TINY["data"])}


class AttentionWithExtraState(SDPACoreAttention):
    """The core attention with an extra state, as Transformer Engine's attention has."""

    def get_extra_state(self):
        return {"amax_history": self.amax_history}

    def set_extra_state(self, state):
        self.amax_history = state["amax_history"]


def _build(seed, extra_state: str = ""):
    torch.manual_seed(seed)
    cfg = from_dict(RunConfig, CONFIG)
    model = wrap_with_ddp(build_model(cfg, cuda=False))
    if extra_state:
        for module in model[0].modules():
            if isinstance(module, SDPACoreAttention):
                module.__class__ = AttentionWithExtraState
                module.amax_history = extra_state
    return model, build_optimizer(optimizer_config(cfg, cuda=False), model)


def save_then_load_with_extra_states(root, drop: str, saved_extra_state: str = ""):
    model, optimizer = _build(seed=1, extra_state=saved_extra_state)
    manager = checkpoint.CheckpointManager(Path(root), keep_last=2)
    path = manager.save(1, model, optimizer, checkpoint.CommonState(consumed_samples=8))
    saved = {k: v.clone() for k, v in full_named_tensors(model[0]).items()}

    other, other_optimizer = _build(seed=2, extra_state="fresh")
    if drop:  # a weight the checkpoint does not have
        original = other[0].module.sharded_state_dict

        def renamed(*args, **kwargs):
            state = original(*args, **kwargs)
            state[drop].key = state[drop].key + "_renamed"
            return state

        other[0].module.sharded_state_dict = renamed
    checkpoint.load_model_weights(path, other)
    weights_only = {k: torch.equal(v, saved[k]) for k, v in full_named_tensors(other[0]).items()}
    extra = [m.amax_history for m in other[0].modules() if isinstance(m, AttentionWithExtraState)]

    resumed, resumed_optimizer = _build(seed=3, extra_state="fresh")
    manager.load(path, resumed, resumed_optimizer, load_optimizer=True)
    resumed_equal = all(torch.equal(v, saved[k]) for k, v in full_named_tensors(resumed[0]).items())
    resumed_extra = [m.amax_history for m in resumed[0].modules() if isinstance(m, AttentionWithExtraState)]
    return weights_only, extra, resumed_equal, resumed_extra


def test_extra_states_the_checkpoint_lacks_start_afresh_and_every_weight_loads(tmp_path):
    weights_only, extra, resumed_equal, resumed_extra = run_distributed(
        save_then_load_with_extra_states, 1, root=str(tmp_path), drop=""
    )[0]
    assert weights_only and all(weights_only.values()), weights_only
    assert extra == resumed_extra == ["fresh", "fresh"]  # one per layer, untouched
    assert resumed_equal


def test_extra_states_the_checkpoint_has_are_restored(tmp_path):
    weights_only, extra, resumed_equal, resumed_extra = run_distributed(
        save_then_load_with_extra_states, 1, root=str(tmp_path), drop="", saved_extra_state="trained"
    )[0]
    assert all(weights_only.values()) and resumed_equal
    assert extra == resumed_extra == ["trained", "trained"]


def test_a_weight_the_checkpoint_lacks_is_still_an_error(tmp_path):
    with pytest.raises(Exception, match="final_layernorm.weight_renamed"):
        run_distributed(save_then_load_with_extra_states, 1, root=str(tmp_path), drop="decoder.final_layernorm.weight")
