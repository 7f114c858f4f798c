"""RoPE scaling under context parallelism: a YaRN or Llama 3.1 scaled model at CP = 2 computes the
loss and gradients of one rank, on packed documents with per-document positions (each CP chunk
rotated by its own scaled positions, YaRN's attention factor included); the scaling is really on."""

import pytest

from megatron_ext.parallel import ParallelSizes
from megatron_ext.testing.distributed import run_distributed
from tests.distributed import cp_bodies
from tests.distributed.test_parity import RTOL, assert_same_tensors, max_rel_diff

SCALINGS = {  # the 32-token samples are 4x the original length
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "llama3": {
        "type": "llama3",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}
DOCUMENTS = {"kind": "default", "reset_attention_mask": True, "reset_position_ids": True}


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_scaled_rope_at_cp2_matches_one_rank_on_packed_documents(scaling):
    sections = {"model": {"rope_scaling": SCALINGS[scaling]}, "data": DOCUMENTS}
    weights = run_distributed(cp_bodies.initial_weights, 1, sections=sections)[0]
    common = dict(weights=weights, structure={}, eod=0)
    ref = run_distributed(cp_bodies.model_gradients, 1, ParallelSizes(), sections=sections, **common)[0]
    unscaled = run_distributed(cp_bodies.model_gradients, 1, ParallelSizes(), sections={"data": DOCUMENTS}, **common)
    cp = run_distributed(
        cp_bodies.model_gradients,
        2,
        ParallelSizes(cp=2),
        sections={**sections, "parallel": {"context": 2}},
        **common,
    )
    loss = sum(float(r["loss"]) for r in cp) / len(cp)  # each CP rank reports its DP rank's loss
    worst = assert_same_tensors(cp[0]["grads"], ref["grads"], f"CP=2 {scaling} grads")
    moved = max(max_rel_diff(unscaled[0]["grads"][name], grad) for name, grad in ref["grads"].items())
    print(
        f"[rope scaling {scaling}, CP=2, packed documents] loss {loss:.6f} vs one rank {float(ref['loss']):.6f}, "
        f"grads max rel {worst:.2e}; unscaled RoPE's grads differ by {moved:.2e}"
    )
    assert abs(loss - float(ref["loss"])) <= RTOL * abs(float(ref["loss"]))
    assert moved > 100 * RTOL, f"the scaling changes the gradients by only {moved:.2e}"
