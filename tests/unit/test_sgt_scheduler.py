"""SGT growth schedule and entropy tracking, driven by scripted entropy sequences.

Each schedule test feeds the scheduler per-step layer scores from a script and compares the
events it returns with the event list the SGT rules (deep-first selection, deepening while in
the top-k, deep -> shallow growth, freeze) prescribe.
"""

import json
import math

import pytest
import torch

from megatron_ext.config import ConfigError
from megatron_ext.sgt import EntropyTracker, Event, GrowthConfig, GrowthScheduler, last_query_entropy

NUM_LAYERS, NUM_HEADS = 8, 4
# Small schedule: first selection at step 5, decisions every 4 steps (5, 9, 13, 17, ...).
SMALL = dict(first_selection_step=5, window=4)


def ranking(*layers, num_layers=NUM_LAYERS):
    """Scores that rank ``layers`` first, in the given order, ahead of every other layer."""
    scores = {layer: 0.1 + 0.001 * layer for layer in range(num_layers)}
    for rank, layer in enumerate(layers):
        scores[layer] = 0.9 - 0.1 * rank
    return scores


def head_entropy(kept=(2, 0)):
    """Per-head EMA where ``kept`` are the highest-entropy heads, in that order."""
    values = torch.full((NUM_HEADS,), 0.1, dtype=torch.float64)
    for rank, head in enumerate(kept):
        values[head] = 0.9 - 0.1 * rank
    return {layer: values.clone() for layer in range(NUM_LAYERS)}


def drive(scheduler, script, steps, start=1):
    """Step ``scheduler`` over ``steps`` with ``script(step) -> scores``; return all events."""
    events = []
    for step in range(start, start + steps):
        events += scheduler.step(step, script(step), head_entropy())
    return events


def schedule(**overrides):
    return GrowthScheduler(GrowthConfig(**{**SMALL, **overrides}), NUM_LAYERS, NUM_HEADS)


def test_first_selection_takes_the_deepest_of_the_top_k():
    scheduler = schedule()
    # Layer 2 has the highest entropy, but 5 is the deepest of the top-3 {2, 5, 3}.
    events = drive(scheduler, lambda step: ranking(2, 5, 3), steps=5)
    assert events == [Event("select", 5, 5, 1, (2, 0))]
    assert scheduler.loop_depths == {5: 1} and scheduler.selected_layers == [5]
    assert not scheduler.frozen and scheduler.tracking_needed


def test_nothing_happens_inside_a_window():
    scheduler = schedule()
    events = drive(scheduler, lambda step: ranking(2, 5, 3) if step <= 5 else ranking(6, 4, 1), steps=8)
    assert events == [Event("select", 5, 5, 1, (2, 0))]


def test_selected_layer_still_in_top_k_is_deepened():
    scheduler = schedule(max_loop_depth=2)
    events = drive(scheduler, lambda step: ranking(5, 3, 2), steps=13)
    assert events == [
        Event("select", 5, 5, 1, (2, 0)),
        Event("deepen", 9, 5, 2, (2, 0)),  # 5 is still in the top-k at the window end
        Event("select", 13, 3, 1, (2, 0)),  # 5 is at max depth: grow the next, shallower layer
    ]
    assert scheduler.loop_depths == {5: 2, 3: 1}


def test_with_deepen_latest_only_the_latest_selected_layer_is_deepened():
    scheduler = schedule(max_loop_depth=2, deepen="latest")
    script = {5: ranking(5, 3, 2), 9: ranking(6, 3, 2), 13: ranking(5, 7, 1)}
    events = drive(scheduler, lambda step: script.get(step, ranking(5, 7, 1)), steps=13)
    # At 9, 5 dropped out of the top-k: 3 is selected. At 13, 5 is back in the top-k but 3 (the
    # latest) is not, so 5 is not deepened; 1 is the only top-k layer shallower than 3.
    assert events == [
        Event("select", 5, 5, 1, (2, 0)),
        Event("select", 9, 3, 1, (2, 0)),
        Event("select", 13, 1, 1, (2, 0)),
    ]


def test_by_default_any_selected_layer_back_in_the_top_k_is_deepened_in_selection_order():
    scheduler = schedule(max_loop_depth=2)
    script = {5: ranking(5, 3, 2), 9: ranking(6, 3, 2), 13: ranking(5, 7, 1)}
    events = drive(scheduler, lambda step: script.get(step, ranking(5, 7, 1)), steps=13)
    # As above until 13, where 5 (selected first) is back in the top-k below max depth: it deepens.
    assert events == [
        Event("select", 5, 5, 1, (2, 0)),
        Event("select", 9, 3, 1, (2, 0)),
        Event("deepen", 13, 5, 2, (2, 0)),
    ]


def test_growth_goes_from_deep_to_shallow_only():
    scheduler = schedule(max_selected_layers=4)
    script = {5: ranking(1, 4, 2), 9: ranking(7, 6, 2), 13: ranking(5, 1, 3)}
    events = drive(scheduler, lambda step: script.get(step, ranking(0, 1, 3)), steps=17)
    assert events == [
        Event("select", 5, 4, 1, (2, 0)),
        Event("select", 9, 2, 1, (2, 0)),  # 7 and 6 rank higher but are deeper than 4
        Event("select", 13, 1, 1, (2, 0)),  # 5 and 3 are deeper than 2
        Event("freeze", 17, None, 0, ()),  # top-k {1, 3, 7} (0 excluded): nothing shallower than 1
    ]
    assert scheduler.selected_layers == [4, 2, 1]


def test_shallow_to_deep_growth_is_the_mirror_image():
    """The paper's ablation: the shallowest top-k layer first, then only deeper ones."""
    scheduler = schedule(max_selected_layers=4, growth="shallow_to_deep")
    script = {5: ranking(6, 4, 2), 9: ranking(1, 3, 5), 13: ranking(7, 2, 4)}
    events = drive(scheduler, lambda step: script.get(step, ranking(1, 2, 3)), steps=17)
    assert events == [
        Event("select", 5, 2, 1, (2, 0)),
        Event("select", 9, 3, 1, (2, 0)),  # 1 ranks higher but is shallower than 2
        Event("select", 13, 4, 1, (2, 0)),  # 7 is deeper too, but 4 is the shallowest candidate
        Event("freeze", 17, None, 0, ()),  # top-k {1, 2, 3}: nothing deeper than 4
    ]
    assert scheduler.selected_layers == [2, 3, 4]
    tied = schedule(growth="shallow_to_deep", top_k_layers=1)
    assert drive(tied, lambda step: {layer: 0.5 for layer in range(NUM_LAYERS)}, steps=5)[0].layer == 1


def test_low_entropy_head_selection_keeps_the_lowest():
    entropy = {3: torch.tensor([0.2, 0.9, 0.1, 0.8])}
    high = schedule()
    high.step(5, ranking(3, 2, 1), entropy)
    low = schedule(head_selection="low_entropy")
    low.step(5, ranking(3, 2, 1), entropy)
    assert high.kept_heads(3) == (1, 3) and low.kept_heads(3) == (2, 0)


def test_exponential_fade_follows_the_reference_form():
    scheduler = GrowthScheduler(
        GrowthConfig(first_selection_step=10, window=250, decay_type="exponential"), NUM_LAYERS, NUM_HEADS
    )
    scheduler.step(10, ranking(3, 2, 1), {3: torch.tensor([0.2, 0.9, 0.1, 0.8])})
    for step, fade in [(11, 1.0), (136, 1e-4), (73.5, 1e-2), (260, 1e-8 ** (249 / 250)), (261, 0.0)]:
        assert scheduler.head_factors(3, step)[0] == pytest.approx(fade, rel=1e-9, abs=0.0 if fade else 1e-300)
    assert scheduler.head_factors(3, 136)[1] == 1.0


def test_freeze_after_max_selected_layers():
    scheduler = schedule()
    script = {5: ranking(5, 3, 2), 9: ranking(3, 2, 1), 13: ranking(2, 1, 4)}
    events, tracking = [], []
    for step in range(1, 40):
        events += scheduler.step(step, script.get(step, ranking(1, 4, 6)), head_entropy())
        tracking.append(scheduler.tracking_needed)
    assert events == [
        Event("select", 5, 5, 1, (2, 0)),
        Event("select", 9, 3, 1, (2, 0)),
        Event("select", 13, 2, 1, (2, 0)),
        Event("freeze", 17, None, 0, ()),
    ]
    assert scheduler.frozen and scheduler.loop_depths == {5: 1, 3: 1, 2: 1}
    # Entropy matters until the third selection; after it only a freeze can follow.
    assert all(tracking[:12]) and not any(tracking[12:])


def test_freeze_when_no_candidate_remains():
    scheduler = schedule()
    events = drive(scheduler, lambda step: ranking(1, 2, 3), steps=30)
    # 3 is selected; at 9 the top-k is {1, 2, 3}: 3 is at max depth, 1 and 2 are shallower -> 2.
    # At 13 only 1 is left -> 1. That is three layers: the next window end freezes.
    assert events == [
        Event("select", 5, 3, 1, (2, 0)),
        Event("select", 9, 2, 1, (2, 0)),
        Event("select", 13, 1, 1, (2, 0)),
        Event("freeze", 17, None, 0, ()),
    ]
    scheduler = schedule()
    # 4 is selected; at 9 the top-k {4, 5, 6} holds nothing shallower than 4 and 4 cannot deepen.
    events = drive(scheduler, lambda step: ranking(2, 3, 4) if step < 9 else ranking(4, 5, 6), steps=30)
    assert events == [Event("select", 5, 4, 1, (2, 0)), Event("freeze", 9, None, 0, ())]
    assert scheduler.frozen and not scheduler.tracking_needed
    assert scheduler.step(100, ranking(1, 2, 3), head_entropy()) == []


def test_excluded_layer_zero_is_never_selected():
    scheduler = schedule(top_k_layers=1)
    # Layer 0 has the highest entropy throughout; the top-1 is taken among the other layers.
    events = drive(scheduler, lambda step: ranking(0, 4, 1) if step < 9 else ranking(0, 1, 4), steps=20)
    assert events == [
        Event("select", 5, 4, 1, (2, 0)),
        Event("select", 9, 1, 1, (2, 0)),
        Event("freeze", 13, None, 0, ()),
    ]
    # Every scored layer excluded: no candidate at the first selection, freeze at once.
    scheduler = schedule(exclude_layers=[0, 1])
    assert scheduler.step(5, {0: 0.9, 1: 0.8}, head_entropy()) == [Event("freeze", 5)]


def test_ranking_ties_go_to_the_deeper_layer():
    scheduler = schedule(top_k_layers=1)
    flat = {layer: 0.5 for layer in range(NUM_LAYERS)}
    assert scheduler.step(5, flat, head_entropy()) == [Event("select", 5, 7, 1, (2, 0))]
    scheduler = schedule(top_k_layers=1, num_keep_heads=2)
    ties = {layer: torch.tensor([0.5, 0.7, 0.5, 0.5]) for layer in range(NUM_LAYERS)}
    (event,) = scheduler.step(5, flat, ties)
    assert event.kept_heads == (1, 0)  # equal heads: the lower index


def test_head_factors_fade_linearly_over_one_window():
    scheduler = GrowthScheduler(GrowthConfig(first_selection_step=10, window=250), NUM_LAYERS, NUM_HEADS)
    scheduler.step(10, ranking(3, 2, 1), {3: torch.tensor([0.2, 0.9, 0.1, 0.8])})
    assert scheduler.kept_heads(3) == (1, 3)
    # The reference sets the factors when a step ends, for the next step: the first looped step
    # (11) runs at 1, and they reach 0 at step 10 + 250 + 1.
    for step, fade in [(10, 1.0), (11, 1.0), (12, 1 - 1 / 250), (136, 0.5), (260, 1 / 250), (261, 0.0), (900, 0.0)]:
        factors = scheduler.head_factors(3, step)
        assert factors[1] == factors[3] == 1.0
        assert factors[0] == pytest.approx(fade, abs=1e-12) and factors[2] == factors[0]
    assert scheduler.active_heads(3, 260) == (0, 1, 2, 3)
    assert scheduler.active_heads(3, 261) == (1, 3)  # faded heads are not computed any more
    cosine = GrowthScheduler(
        GrowthConfig(first_selection_step=10, window=250, decay_type="cosine"), NUM_LAYERS, NUM_HEADS
    )
    cosine.step(10, ranking(3, 2, 1), {3: torch.tensor([0.2, 0.9, 0.1, 0.8])})
    for step, fade in [(11, 1.0), (136, 0.5), (73.5, 0.5 * (1 + math.cos(math.pi / 4))), (261, 0.0)]:
        assert cosine.head_factors(3, step)[0] == pytest.approx(fade, abs=1e-12)
    with pytest.raises(KeyError, match="not selected"):
        scheduler.head_factors(4, 20)


def test_deepening_does_not_restart_the_fade():
    scheduler = schedule(max_loop_depth=2, window=10)
    drive(scheduler, lambda step: ranking(6, 3, 2), steps=15)
    assert scheduler.loop_depths == {6: 2}
    assert scheduler.head_factors(6, 16) == [1.0, 0.0, 1.0, 0.0]


def test_state_dict_round_trip_mid_schedule_gives_the_same_events():
    def script(step):
        return [ranking(5, 3, 2), ranking(3, 6, 2), ranking(4, 2, 1), ranking(1, 7, 2)][(step // 4) % 4]

    original = schedule(max_loop_depth=2)
    drive(original, script, steps=11)
    state = json.loads(json.dumps(original.state_dict()))  # layer keys become strings
    restored = schedule(max_loop_depth=2)
    restored.load_state_dict(state)
    assert restored.state_dict() == original.state_dict()
    assert restored.head_factors(4, 12) == original.head_factors(4, 12)
    expected = drive(original, script, steps=30, start=12)
    assert expected and drive(restored, script, steps=30, start=12) == expected
    assert restored.state_dict() == original.state_dict()


def test_reference_configuration_schedule():
    config = GrowthConfig()
    assert config == GrowthConfig(
        first_selection_step=250,
        window=250,
        top_k_layers=3,
        max_selected_layers=3,
        max_loop_depth=1,
        num_keep_heads=2,
        exclude_layers=[0],
    )
    scheduler = GrowthScheduler(config, num_layers=16, num_heads=16)
    heads = {layer: torch.linspace(0, 1, 16) for layer in range(16)}
    events = []
    for step in range(1, 2000):
        scores = ranking(0, 9, 12, 4, 11, num_layers=16) if step < 700 else ranking(0, 3, 2, 8, num_layers=16)
        events += scheduler.step(step, scores, heads)
    # Top-3 without layer 0: {9, 12, 4} -> 12, then 9 (shallower than 12); later {3, 2, 8} -> 8.
    assert events == [
        Event("select", 250, 12, 1, (15, 14)),
        Event("select", 500, 9, 1, (15, 14)),
        Event("select", 750, 8, 1, (15, 14)),
        Event("freeze", 1000, None, 0, ()),
    ]


def test_config_validation_names_field_value_and_rule():
    with pytest.raises(ValueError) as info:
        GrowthConfig(window=0, num_keep_heads=-1, exclude_layers=[-1])
    problems = info.value.problems
    assert "window=0 is not allowed: it must be an int >= 1" in problems
    assert "num_keep_heads=-1 is not allowed: it must be an int >= 1" in problems
    assert any(p.startswith("exclude_layers=[-1] is not allowed") for p in problems)
    with pytest.raises(ConfigError, match="top_k_layers=True"):
        GrowthConfig(top_k_layers=True)
    with pytest.raises(ValueError, match="num_keep_heads=5"):
        GrowthScheduler(GrowthConfig(num_keep_heads=5), NUM_LAYERS, NUM_HEADS)
    with pytest.raises(ValueError, match="exclude_layers"):
        GrowthScheduler(GrowthConfig(exclude_layers=[8]), NUM_LAYERS, NUM_HEADS)
    with pytest.raises(ValueError, match="non-finite"):
        schedule().step(5, {3: math.nan}, head_entropy())


# -- entropy ------------------------------------------------------------------------------


def assert_close(actual, expected, atol=1e-6):
    # torch.testing.assert_close costs over a second of lazy imports on its first call.
    assert actual.shape == expected.shape and torch.allclose(actual.double(), expected.double(), atol=atol), (
        actual,
        expected,
    )


def dense_last_row_entropy(q, k, scale):
    """Entropy of the last row of a full causal attention matrix (q, k: [b, h, T, d])."""
    t = q.shape[2]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, -math.inf).softmax(dim=-1)
    last = probs[:, :, -1, :]
    return -(last * last.clamp_min(1e-300).log()).sum(-1) / math.log(t)


def test_last_query_entropy_matches_the_dense_causal_attention():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 17, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, 17, 8, generator=gen, dtype=torch.float64)
    entropy = last_query_entropy(q[:, :, -1], k, scale=8**-0.5)
    assert entropy.shape == (3, 4) and not entropy.requires_grad
    assert_close(entropy, dense_last_row_entropy(q.detach(), k, 8**-0.5), atol=1e-12)
    assert 0.0 < entropy.min() and entropy.max() < 1.0


def test_last_query_entropy_with_grouped_query_attention():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 9, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 4, generator=gen, dtype=torch.float64) * 3
    entropy = last_query_entropy(q[:, :, -1], k, scale=0.5, num_kv_groups=3)
    # Query heads 0-2 use KV head 0, heads 3-5 use KV head 1.
    expected = dense_last_row_entropy(q, k.repeat_interleave(3, dim=1), 0.5)
    assert_close(entropy, expected, atol=1e-12)
    with pytest.raises(ValueError, match="num_kv_groups=2"):
        last_query_entropy(q[:, :, -1], k, scale=0.5, num_kv_groups=2)


def test_uniform_attention_has_entropy_one_and_a_single_key_zero():
    q = torch.zeros(2, 3, 8)
    k = torch.randn(2, 3, 50, 8)
    assert_close(last_query_entropy(q, k, scale=1.0), torch.ones(2, 3))
    assert_close(last_query_entropy(q, k[:, :, :1], scale=1.0), torch.zeros(2, 3))


def test_tracker_averages_micro_batches_then_updates_the_ema():
    tracker = EntropyTracker(layers=[0, 1, 2], num_heads=2)
    tracker.accumulate(1, torch.tensor([0.2, 0.4]))
    tracker.accumulate(1, torch.tensor([0.4, 0.8]))
    tracker.accumulate(2, torch.tensor([0.6, 0.6]))
    tracker.end_step()
    # First observation initializes the EMA: the micro-batch mean.
    assert_close(tracker.head_ema(1), torch.tensor([0.3, 0.6], dtype=torch.float64))
    tracker.accumulate(1, torch.tensor([0.5, 0.2]))
    tracker.end_step()
    # ema = 0.5 * ema + 0.5 * new; layer 2 was not observed and keeps its EMA.
    assert_close(tracker.head_ema(1), torch.tensor([0.4, 0.4], dtype=torch.float64))
    scores = tracker.layer_scores()
    assert list(scores) == [1, 2]
    assert scores[1] == pytest.approx(0.4) and scores[2] == pytest.approx(0.6)
    with pytest.raises(KeyError, match="no observation yet"):
        tracker.head_ema(0)
    with pytest.raises(KeyError, match="not tracked"):
        tracker.accumulate(3, torch.zeros(2))


def test_tracker_averages_over_data_parallel_ranks(monkeypatch):
    import torch.distributed as dist

    other_rank = torch.tensor([[0.0, 0.2], [1.0, 1.0]])  # layers 1 and 2 on a second rank

    def all_reduce(tensor, op, group):
        assert op == dist.ReduceOp.SUM
        tensor += other_rank

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda group: 2)
    tracker = EntropyTracker(layers=[1, 2], num_heads=2)
    tracker.accumulate(1, torch.tensor([0.4, 0.6]))
    tracker.accumulate(2, torch.tensor([0.0, 0.5]))
    tracker.end_step(dp_group=object())
    assert_close(tracker.head_ema(1), torch.tensor([0.2, 0.4], dtype=torch.float64))
    assert_close(tracker.head_ema(2), torch.tensor([0.5, 0.75], dtype=torch.float64))


def test_tracker_state_round_trip():
    gen = torch.Generator().manual_seed(2)
    observations = torch.rand(6, 3, 4, generator=gen)  # steps x layers x heads
    original = EntropyTracker(layers=[1, 2, 5], num_heads=4)
    for step in range(3):
        original.accumulate(1, observations[step, 0])
        original.accumulate(2, observations[step, 1])
        original.end_step()
    state = original.state_dict()
    restored = EntropyTracker(layers=[1, 2, 5], num_heads=4)
    restored.load_state_dict(state)
    assert restored.layer_scores() == original.layer_scores()
    with pytest.raises(KeyError):
        restored.head_ema(5)  # still unobserved: its first observation will initialize it
    for tracker in (original, restored):
        for step in range(3, 6):
            for i, layer in enumerate([1, 2, 5]):
                tracker.accumulate(layer, observations[step, i])
            tracker.end_step()
    for layer in (1, 2, 5):
        assert torch.equal(restored.head_ema(layer), original.head_ema(layer))
    original.accumulate(1, observations[0, 0])
    with pytest.raises(RuntimeError, match="end_step"):
        original.state_dict()
    with pytest.raises(ValueError, match="layers"):
        EntropyTracker(layers=[1, 2], num_heads=4).load_state_dict(state)
