"""Golden-value regression: the trainer reproduces the committed per-step figures bit for bit.

Losses, gradient norms, learning rates, validation losses and every method metric (ConSA gates and
multipliers, MoE loads and expert bias, elastic draws, SGT loop structure and entropies) of short
runs at the smoke layout and at TP=2, PP=2 and EP=2 with every capability on (tests/golden/cases.py).
A refactor must keep them equal; a compute change regenerates them (python -m tests.golden.regenerate)
and says why they moved.
"""

import pytest

from megatron_ext.testing.distributed import run_distributed
from tests.golden.cases import case_configs, load_golden, run_case

GOLDEN = load_golden()
CASES = case_configs()


def _first_difference(got, want):
    for step, (a, b) in enumerate(zip(got, want), start=1):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"step {step}, {key!r}: got {a.get(key)!r}, golden {b.get(key)!r}"
    return f"{len(got)} records, golden {len(want)}"


def test_every_case_has_golden_values():
    assert sorted(GOLDEN) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_reproduces_the_golden_values_bitwise(tmp_path, case):
    got = run_distributed(run_case, 2, None, config=CASES[case], run_dir=str(tmp_path), timeout=900)[0]
    want = GOLDEN[case]
    assert len(want) == CASES[case]["train"]["steps"]
    assert got == want, f"{case}: first difference at {_first_difference(got, want)}"
