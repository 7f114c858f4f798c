"""Golden-value regression: the trainer reproduces the committed per-step figures.

Losses, gradient norms, learning rates, validation losses and every method metric (ConSA gates and
multipliers, MoE loads and expert bias, elastic draws, SGT loop structure and entropies) of short
runs at the smoke layout and at TP=2, PP=2 and EP=2 with every capability on (tests/golden/cases.py).

The file records the environment it was taken in (``cases.environment``). Where this machine's
environment is the same, the figures must be equal bit for bit: a refactor must not move one. Elsewhere
(another CPU, SIMD level, BLAS, library version, or the blocked kernel where no compiler built the
fused one) float figures are compared within ``cases.TOLERANCES`` and the environment difference is
printed. A compute change regenerates the file (python -m tests.golden.regenerate) and says why the
figures moved.
"""

import copy

import pytest

from megatron_ext.testing.distributed import run_distributed
from tests.golden.cases import (
    case_configs,
    environment,
    environment_difference,
    first_difference,
    load_golden,
    run_case,
)

GOLDEN = load_golden()
CASES = case_configs()


@pytest.fixture(scope="module")
def environment_here():
    here = run_distributed(environment, 2, None)[0]
    differences = environment_difference(here, GOLDEN["environment"])
    if differences:
        print("golden values were recorded in another environment; comparing within tolerances:")
        for key, (now, then) in differences.items():
            print(f"  {key}: here {now!r}, recorded {then!r}")
    return here


def _run(case: str, run_dir, config=None):
    return run_distributed(run_case, 2, None, config=config or CASES[case], run_dir=str(run_dir), timeout=900)[0]


def test_every_case_has_golden_values():
    assert sorted(GOLDEN["cases"]) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_reproduces_the_golden_values(tmp_path, environment_here, case):
    exact = not environment_difference(environment_here, GOLDEN["environment"])
    want = GOLDEN["cases"][case]
    assert len(want) == CASES[case]["train"]["steps"]
    difference = first_difference(_run(case, tmp_path), want, exact=exact)
    assert difference is None, (
        f"{case} ({'bitwise' if exact else 'within tolerance'}): first difference at {difference}"
    )


class _TorchWithSwappedLerp:
    """``torch`` as ConSA's attention module sees it, with ``lerp``'s end points swapped: the gate
    mixes ``z * swa + (1 - z) * full`` instead of ``z * full + (1 - z) * swa``."""

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    @staticmethod
    def lerp(start, end, weight):
        import torch

        return torch.lerp(end, start, weight)


def _run_perturbed(perturbation: str, config: dict, run_dir: str):
    """A golden case with one deliberate change of computation (on the ranks; undone after)."""
    import contextlib
    from unittest import mock

    from megatron_ext.consa import attention as consa_attention
    from megatron_ext.sgt.looped_layer import LoopedTransformerLayer

    config = copy.deepcopy(config)
    patch = contextlib.nullcontext()
    if perturbation == "lr_plus_1_percent":
        config["train"]["lr"] *= 1.01
    elif perturbation == "swapped_gate_argument":
        patch = mock.patch.object(consa_attention, "torch", _TorchWithSwappedLerp())
    elif perturbation == "one_extra_loop_pass":
        set_loop = LoopedTransformerLayer.set_loop

        def set_loop_plus_one(self, depth, method="sgt"):
            set_loop(self, depth + 1 if depth else 0, method)

        patch = mock.patch.object(LoopedTransformerLayer, "set_loop", set_loop_plus_one)
    with patch:
        return run_case(config, run_dir)


_TRAJECTORY = ("loss", "grad_norm", "val/loss")


@pytest.mark.parametrize("perturbation", ["lr_plus_1_percent", "swapped_gate_argument", "one_extra_loop_pass"])
def test_the_tolerances_catch_a_real_change_of_computation(tmp_path, perturbation):
    """Each deliberate change moves the loss trajectory (loss, gradient norm, validation loss) of a
    case with every capability on beyond the tolerances that absorb a change of environment."""
    case = "pp2"
    got = run_distributed(
        _run_perturbed, 2, None, perturbation=perturbation, config=CASES[case], run_dir=str(tmp_path), timeout=900
    )[0]

    def trajectory(records):
        return [{key: r[key] for key in _TRAJECTORY if key in r} for r in records]

    difference = first_difference(trajectory(got), trajectory(GOLDEN["cases"][case]), exact=False)
    print(f"{perturbation}: {difference}")
    assert difference is not None, f"{perturbation} stayed within the golden tolerances"
