"""ConSA's per-unit diagnostics are computed right: the window cost of each unit alone on SWA, and the
moments of the LM and constraint parts of each gate-logit gradient over mask learning.

* Each unit's window cost equals an independent evaluation of the warm-up weights (a separate run
  that stops at the warm-up's end, evaluated on one rank by the reference helper of the planted test)
  with that unit alone on SWA, on the same validation batches; the run itself is at TP = 2.
* The gradient moments equal the mean / spread of the per-step parts the callback applied, recorded
  step by step by a spy, and the constraint part is the gradient of the Lagrangian term alone.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ext.config import from_dict
from megatron_ext.consa.diagnostics import GradientStats
from megatron_ext.run import RunConfig
from megatron_ext.testing.callbacks import PreemptAfter
from megatron_ext.testing.distributed import run_distributed
from megatron_ext.training.loop import Trainer
from tests.configs import TINY, merge
from tests.distributed.test_consa_planted import allocation_losses

WARM_UP, LEARN, EVAL_STEPS = 6, 5, 2
CONFIG = merge(
    TINY,
    {
        "model": {"qk_layernorm": True},
        "data": {"seq_length": 32},
        "train": {"steps": WARM_UP + LEARN + 1, "eval_interval": WARM_UP, "eval_steps": EVAL_STEPS, "lr": 1e-2},
        "hybrid_attention": {
            "enabled": True,
            "method": "consa",
            "granularity": "kv_head",
            "window": 4,
            "target": 0.5,
            "constraint": "per_layer",
            "mask_learning_start_step": WARM_UP,
            "mask_learning_steps": LEARN,
            "target_warmup_steps": 2,
            "unit_window_cost": True,
        },
        "logging": {"log_interval": 1},
        "checkpoint": {"save_interval": 0, "save_at_end": True},
    },
)


def train(run_dir, tensor=1, stop_after=None):
    data = merge(CONFIG, {"parallel": {"tensor": tensor}})
    callbacks = [PreemptAfter(stop_after)] if stop_after else []  # checkpoints and stops there
    trainer = Trainer(from_dict(RunConfig, data), Path(run_dir), callbacks=callbacks, log=lambda line: None)
    consa = next(c for c in trainer.callbacks if c.name == "hybrid_attention")
    applied = []  # (LM part, constraint part) of every gate update
    update = consa._update_gates

    def spy(step, update_successful):
        # the constraint part recomputed independently, from the gates and multipliers the step starts with
        controller, gates = copy.deepcopy(consa.controller), copy.deepcopy(consa.gates)
        rho_hat = gates.expected_swa_fraction(consa.cfg.constraint)
        (constraint,) = torch.autograd.grad(controller.constraint_loss(rho_hat, step), [gates.log_alpha])
        metrics = update(step, update_successful)
        if update_successful:
            applied.append((consa.last_lm_grad.clone(), constraint))
        return metrics

    consa._update_gates = spy
    trainer.run()
    diagnosed = consa.diagnosed
    return {
        "unit_cost": None if consa.unit_window_cost is None else consa.unit_window_cost.tolist(),
        "full": None if consa.window_losses is None else consa.window_losses["full"],
        "diagnostics": diagnosed,
        "applied": [(a.tolist(), b.tolist()) for a, b in applied],
    }


def test_gradient_stats_are_the_moments_of_the_stream():
    torch.manual_seed(0)
    stream = [(torch.randn(3, 2) * (torch.rand(3, 2) > 0.4), torch.randn(3, 2)) for _ in range(17)]
    stats = GradientStats((3, 2))
    for lm, constraint in stream:
        stats.update(lm, constraint)
    summary = stats.summary()
    lm = np.stack([a.numpy() for a, _ in stream]).astype(np.float64)
    constraint = np.stack([b.numpy() for _, b in stream]).astype(np.float64)
    assert summary["steps"] == 17
    np.testing.assert_allclose(summary["lm_mean"], lm.mean(0), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(summary["lm_std"], lm.std(0), rtol=1e-5)
    np.testing.assert_allclose(summary["constraint_mean"], constraint.mean(0), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(summary["constraint_std"], constraint.std(0), rtol=1e-5)
    np.testing.assert_allclose(summary["active_fraction"], (lm != 0).mean(0), rtol=1e-5)
    separation = (lm.mean(0) - lm.mean()) / (lm.std(0) / np.sqrt(17))
    np.testing.assert_allclose(summary["separation"], separation, rtol=1e-5)
    restored = GradientStats((3, 2))
    restored.load_state_dict(stats.state_dict())
    assert restored.summary() == summary
    assert GradientStats((1, 1)).summary() == {}


@pytest.mark.parametrize("tensor", [2])
def test_unit_window_cost_and_gradient_moments_are_computed_right(tmp_path, tensor):
    out = run_distributed(train, tensor, None, run_dir=str(tmp_path / "run"), tensor=tensor)[0]
    # the warm-up weights again (the same run, stopped there), evaluated on one rank per allocation
    run_distributed(train, 1, None, run_dir=str(tmp_path / "warm"), stop_after=WARM_UP)
    layers, units = CONFIG["model"]["num_layers"], CONFIG["model"]["num_query_groups"]
    alone = []
    for layer in range(layers):
        for unit in range(units):
            table = torch.ones(layers, units, dtype=torch.bool)
            table[layer, unit] = False
            alone.append(table)
    reference = run_distributed(
        allocation_losses,
        1,
        run_dir=str(tmp_path / "warm"),
        allocations=[torch.ones(layers, units).bool(), *alone],
        batches=EVAL_STEPS,
    )[0]
    cost = np.array(out["unit_cost"])
    assert cost.shape == (layers, units)
    np.testing.assert_allclose(out["full"], reference[0], rtol=1e-5)
    np.testing.assert_allclose(cost.flatten(), np.array(reference[1:]) - reference[0], atol=2e-5)
    assert (np.abs(cost) > 1e-4).any()  # W = 4 < 32 keys: some unit's window matters
    assert out["diagnostics"]["unit_window_cost"] == [[round(x, 6) for x in row] for row in out["unit_cost"]]

    gradients = out["diagnostics"]["gradients"]
    lm = np.array([a for a, _ in out["applied"]], dtype=np.float64)
    constraint = np.array([b for _, b in out["applied"]], dtype=np.float64)
    assert gradients["steps"] == len(out["applied"]) == LEARN
    np.testing.assert_allclose(gradients["lm_mean"], lm.mean(0), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(gradients["lm_std"], lm.std(0), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(gradients["constraint_mean"], constraint.mean(0), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(gradients["active_fraction"], (lm != 0).mean(0), rtol=1e-5)
    assert np.abs(lm).sum() > 0 and np.abs(constraint).sum() > 0
