"""The attention-behaviour analysis on planted heads: statistics of constructed last-token rows, their
classes, and the probabilities taken from query / key tensors (a head whose query matches the previous
token's key only, and one that matches no key)."""

import math

import pytest
import torch

from megatron_ext.experiments.analysis import (
    CLASSES,
    attention_statistics,
    classify,
    last_token_probabilities,
)

T, W = 64, 8


def test_planted_rows_classify_as_their_behaviour():
    previous = torch.zeros(T)
    previous[T - 2] = 1.0  # the previous token only
    uniform = torch.full((T,), 1.0 / T)
    in_window = torch.zeros(T)
    in_window[T - W :] = 1.0 / W  # spread evenly over the window
    half = torch.zeros(T)
    half[T - 2], half[0] = 0.7, 0.3  # most within the window, a material part far
    sink = torch.zeros(T)
    sink[0], sink[T - 1] = 0.9, 0.1  # one far key: attention sink
    broad = torch.zeros(T)
    broad[: T - W] = 1.0 / (T - W)  # everything beyond the window, spread (but not uniform: H < 0.9)
    broad = 0.5 * broad + 0.5 * torch.softmax(-torch.arange(T, dtype=torch.float) / 4, 0)
    stats = attention_statistics(torch.stack([previous, uniform, in_window, half, sink, broad]), W)
    entropy, mass, distance = stats["entropy"], stats["local_mass"], stats["distance"]
    assert entropy[0] == 0 and mass[0] == 1 and distance[0] == 1
    assert math.isclose(entropy[1], 1.0, rel_tol=1e-12) and math.isclose(mass[1], W / T, rel_tol=1e-12)
    assert math.isclose(distance[1], (T - 1) / 2, rel_tol=1e-12)
    assert math.isclose(entropy[2], math.log(W) / math.log(T), rel_tol=1e-12)
    classes = [classify(float(h), float(m)) for h, m in zip(entropy, mass)]
    assert classes == ["strongly local", "uniform", "strongly local", "weakly local", "sparse-broad", "dense-broad"]
    assert set(classes) == set(CLASSES)


def test_probabilities_from_queries_and_keys():
    """Head 0 (KV head 0) looks at the previous token, head 1 (KV head 1) at nothing in particular;
    with a window plan the probabilities are renormalised over the window's keys."""
    s, hn = 16, 4
    key = torch.zeros(s, 1, 2, hn)
    key[s - 2, 0, 0, 0] = 1.0  # only the previous token's key of KV head 0 points along e0
    query = torch.zeros(s, 1, 2, hn)
    query[-1, 0, 0, 0] = 100.0
    probs = last_token_probabilities(query, key, scale=1.0)  # [b, nq, s]
    assert probs.shape == (1, 2, s)
    assert probs[0, 0, s - 2] > 1 - 1e-12
    assert torch.allclose(probs[0, 1], torch.full((s,), 1.0 / s, dtype=probs.dtype))
    stats = attention_statistics(probs, W)
    assert [classify(float(h), float(m)) for h, m in zip(stats["entropy"][0], stats["local_mass"][0])] == [
        "strongly local",
        "uniform",
    ]
    windowed = last_token_probabilities(query, key, scale=1.0, plans=[(None, 0), (4, 1)])
    assert windowed[0, 1, 0] == pytest.approx(0.2) and windowed[0, 1, s - 4 :].sum() == pytest.approx(0.8)
    assert windowed[0, 1, 1 : s - 4].sum() == 0
