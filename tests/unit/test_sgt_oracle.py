"""Oracle: scripted entropy sequences (ordinary and loop passes) replayed through our entropy
tracking and growth schedule give the event sequence the reference SGT rules prescribe.

The expected events are written by hand from the reference's rules (first selection: the deepest of
the top-k; at a window end, deepen the first selected layer, in selection order, still in the top-k
and below max depth; else select the deepest top-k layer shallower than every selected one while
fewer than max are selected; else freeze; a looping layer's kept heads are scored by their last loop
pass). The harness does per step what :class:`~megatron_ext.sgt.callback.SGTCallback` does.
"""

import pytest
import torch

from megatron_ext.sgt.config import GrowthConfig
from megatron_ext.sgt.entropy import EntropyTracker, merge_loop_entropy
from megatron_ext.sgt.scheduler import Event, GrowthScheduler

LAYERS, HEADS = 8, 4
KEPT = (0, 1)  # every layer's heads are ordered 0 > 1 > 2 > 3 in entropy


def heads(mean):
    """Four head entropies with ``mean``, ordered head 0 highest."""
    return torch.tensor([mean + 0.015, mean + 0.005, mean - 0.005, mean - 0.015], dtype=torch.float64)


def scores(top, rest=0.1):
    """First-pass entropy of every layer: ``top`` (``{layer: mean}``), the others low."""
    return {layer: heads(top.get(layer, rest + 0.001 * layer)) for layer in range(LAYERS)}


def replay(script, steps, merge=True, decay=0.0, **config):
    """``script(step) -> ({layer: first pass}, {layer: last loop pass})``; returns the events."""
    cfg = GrowthConfig(
        **{
            **dict(
                first_selection_step=3,
                window=3,
                top_k_layers=3,
                max_selected_layers=3,
                max_loop_depth=1,
                num_keep_heads=2,
                exclude_layers=[0],
            ),
            **config,
        }
    )
    scheduler = GrowthScheduler(cfg, LAYERS, HEADS)
    tracker = EntropyTracker(range(LAYERS), HEADS, decay=decay)
    events = []
    for step in range(1, steps + 1):
        first, loop = script(step)
        for layer, entropy in first.items():
            looping = layer in scheduler.loop_depths
            last = loop.get(layer, entropy) if looping else None
            kept = scheduler.kept_heads(layer) if looping and merge else ()
            tracker.accumulate(layer, merge_loop_entropy(entropy, last, kept))
        tracker.end_step()
        events += scheduler.step(step, tracker.layer_scores(), tracker.head_emas())
    return events


def select(step, layer):
    return Event("select", step, layer, 1, KEPT)


def deepen(step, layer, depth=2):
    return Event("deepen", step, layer, depth, KEPT)


def freeze(step):
    return Event("freeze", step)


def constant(top):
    return lambda step: (scores(top), {})


def test_released_depth_one_grows_three_layers_deep_to_shallow_then_freezes():
    events = replay(constant({5: 0.9, 3: 0.8, 6: 0.7}), steps=14)
    assert events == [select(3, 6), select(6, 5), select(9, 3), freeze(12)]


def test_depth_two_deepens_each_layer_once_before_the_next_is_selected():
    events = replay(constant({6: 0.9, 4: 0.8, 2: 0.7}), steps=23, max_loop_depth=2)
    assert events == [select(3, 6), deepen(6, 6), select(9, 4), deepen(12, 4), select(15, 2), deepen(18, 2), freeze(21)]


def test_an_earlier_layer_back_in_the_top_k_deepens_first():
    def script(step):
        top = (
            {6: 0.9, 5: 0.8, 4: 0.7}
            if step <= 5
            else {5: 0.9, 4: 0.8, 3: 0.7}
            if step <= 8
            else {6: 0.9, 5: 0.8, 1: 0.7}
        )
        return scores(top), {}

    expected = [select(3, 6), select(6, 5), deepen(9, 6), deepen(12, 5), select(15, 1), deepen(18, 1), freeze(21)]
    assert replay(script, steps=23, max_loop_depth=2) == expected
    # The other rule deepens the latest layer at 9 instead: the scenario tells them apart.
    assert replay(script, steps=23, max_loop_depth=2, deepen="latest")[2] == deepen(9, 5)


def test_kept_heads_scored_by_their_last_loop_pass_steer_the_next_decision():
    first = scores({6: 0.4875, 5: 0.45, 3: 0.4, 2: 0.35})
    first[6] = torch.tensor([0.9, 0.85, 0.1, 0.1], dtype=torch.float64)  # two strong heads carry layer 6

    def script(step):  # layer 6's kept heads (0, 1) attend sharply in their loop pass
        return first, {6: torch.tensor([0.0, 0.0, 0.1, 0.1], dtype=torch.float64)}

    events = replay(script, steps=20, max_loop_depth=2)
    # From step 4 layer 6 scores (0 + 0 + 0.1 + 0.1) / 4 and leaves the top-k {5, 3, 2}: at 6 it is not
    # deepened, 5 is selected; 5 deepens at 9, 3 is selected at 12 and deepens at 15; freeze at 18.
    assert events == [select(3, 6), select(6, 5), deepen(9, 5), select(12, 3), deepen(15, 3), freeze(18)]
    # Scored on the ordinary pass only, layer 6 would have stayed on top and deepened at 6.
    assert replay(script, steps=20, max_loop_depth=2, merge=False)[1] == deepen(6, 6)


def test_excluded_layers_and_no_shallower_candidate_freeze_with_an_ema():
    events = replay(constant({0: 0.95, 2: 0.9, 1: 0.8}), steps=12, decay=0.5, top_k_layers=2)
    assert events == [select(3, 2), select(6, 1), freeze(9)]


@pytest.mark.parametrize("decay_type", ["linear", "cosine"])
def test_the_fade_starts_the_step_after_selection_and_ends_one_window_later(decay_type):
    cfg = GrowthConfig(
        first_selection_step=3,
        window=4,
        top_k_layers=3,
        max_selected_layers=1,
        max_loop_depth=1,
        num_keep_heads=2,
        decay_type=decay_type,
    )
    scheduler = GrowthScheduler(cfg, LAYERS, HEADS)
    scheduler.step(3, {6: 0.9, 5: 0.8, 4: 0.7}, {6: heads(0.9)})
    fades = [scheduler.head_factors(6, step)[2] for step in range(4, 10)]
    assert fades[0] == 1.0 and fades[4:] == [0.0, 0.0] and all(a > b for a, b in zip(fades[:5], fades[1:5]))


def test_a_sliding_window_head_is_scored_on_the_keys_it_sees():
    from megatron_ext.sgt.entropy import seen_keys_entropy

    gen = torch.Generator().manual_seed(0)
    b, t, d, window, sink = 2, 40, 8, 6, 2
    q = torch.randn(b, 3, d, generator=gen)
    k = torch.randn(b, 3, t, d, generator=gen)
    plans = [(None, 0), (window, 0), (window, sink)]
    got = seen_keys_entropy(q, k, 0.3, [0, 1, 2], plans)

    def reference(head, keys):
        p = torch.softmax(0.3 * torch.einsum("bd,btd->bt", q[:, head].double(), k[:, head, keys].double()), -1)
        return -(p * p.log()).sum(-1) / torch.log(torch.tensor(float(len(keys))))

    expected = torch.stack(
        [
            reference(0, list(range(t))),
            reference(1, list(range(t - window, t))),
            reference(2, [0, 1] + list(range(t - window, t))),
        ],
        dim=1,
    )
    assert torch.allclose(got.double(), expected, atol=1e-6)
    full = seen_keys_entropy(q, k, 0.3, [0, 1, 2])  # the full row differs: the window matters
    assert (full[:, 1] - got[:, 1]).abs().max() > 1e-2


def test_entropy_of_bf16_inputs_is_computed_in_fp32():
    from megatron_ext.sgt.entropy import last_query_entropy

    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 64, generator=gen), torch.randn(2, 4, 512, 64, generator=gen)
    q16, k16 = q.bfloat16(), k.bfloat16()
    exact = last_query_entropy(q16.double(), k16.double(), 0.125)
    assert (last_query_entropy(q16, k16, 0.125).double() - exact).abs().max() < 1e-5


def test_loop_pass_entropy_replaces_only_the_kept_heads():
    first = torch.tensor([0.5, 0.6, 0.7, 0.8])
    last = torch.tensor([0.1, float("nan"), 0.3, float("nan")])
    assert merge_loop_entropy(first, last, [0, 2]).tolist() == pytest.approx([0.1, 0.6, 0.3, 0.8])
    assert merge_loop_entropy(first, None, [0, 2]) is first


def test_a_submodel_that_drops_layer_0_still_excludes_its_own_first_layer(tmp_path):
    import copy

    from megatron_ext.config import from_dict
    from megatron_ext.moe.elastic import SubNetwork
    from megatron_ext.run import RunConfig
    from megatron_ext.sgt.capability import Looping

    cfg = from_dict(RunConfig, {"model": {"num_layers": 6}, "looping": {"enabled": True, "exclude_layers": [0, 3]}})
    small = copy.deepcopy(cfg)
    Looping().submodel_config(cfg, small, SubNetwork((1, 3, 4), None, None), tmp_path)
    assert small.looping.exclude_layers == [0, 1]  # old layer 3 is new layer 1; new layer 0 is the first
