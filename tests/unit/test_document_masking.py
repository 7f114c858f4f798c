"""Document masking (``data.reset_attention_mask``) in the attention kernels: every kernel, given the
document starts of a packed sequence, equals running each document through it on its own."""

from functools import partial

import pytest
import torch
from torch.testing import assert_close

from megatron_ext.models import fused_swa
from megatron_ext.models.documents import document_starts, document_starts_of, key_starts, visible_keys
from megatron_ext.models.kernels import (
    causal_attention,
    causal_attention_reference,
    document_window_mask_mod,
    sink_window_attention,
    sink_window_attention_reference,
    sliding_window_attention,
    sliding_window_attention_blocked,
    sliding_window_attention_reference,
)

EOD = 0
TOL = dict(rtol=2e-5, atol=2e-5)


def packed_tokens(lengths_per_row, seed=0):
    """``[b, T]`` token ids: each row the documents of the given lengths, each ending with EOD (the
    last may be cut off by the sequence's end, as in Megatron's packing)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        row = []
        for n in lengths:
            row += torch.randint(1, 50, (n - 1,), generator=gen).tolist() + [EOD]
        rows.append(row)
    t = min(len(r) for r in rows)
    return torch.tensor([r[:t] for r in rows])


def documents(tokens_row):
    """[(start, stop)] of one row, by Megatron's rule: a document ends with (and includes) its EOD."""
    spans, start = [], 0
    for i, token in enumerate(tokens_row.tolist()):
        if token == EOD:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(tokens_row):
        spans.append((start, len(tokens_row)))
    return spans


def test_document_starts_match_megatrons_dense_mask_and_reset_positions():
    """``document_starts`` is Megatron-LM's reset_attention_mask / reset_position_ids, compactly: the
    dense mask Megatron's dataset builds equals the keys a document start lets each query see, and
    ``position - start`` equals Megatron's reset position ids."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens = packed_tokens([[5, 9, 1, 7, 20], [3, 3, 30, 6]], seed=1)
    starts = document_starts(tokens, EOD)
    for row in range(tokens.shape[0]):
        mask, _, position_ids = _get_ltor_masks_and_position_ids(tokens[row], EOD, True, True, False, True)
        megatron_hidden = mask[0]  # True = masked out
        ours = visible_keys(tokens.shape[1], tokens.shape[1], starts[row : row + 1], None, 0, tokens.device)[0, 0]
        assert torch.equal(ours, ~megatron_hidden)
        assert torch.equal(torch.arange(tokens.shape[1]) - starts[row], position_ids)


def test_document_starts_without_an_eod_is_one_document():
    tokens = torch.randint(1, 9, (2, 12))
    assert torch.equal(document_starts(tokens, EOD), torch.zeros(2, 12, dtype=torch.long))


def test_a_dense_mask_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="model.attention_backend: local"):
        document_starts_of(torch.ones(1, 1, 4, 4, dtype=torch.bool))
    assert document_starts_of(None) is None


def fused(q, k, v, window, key_start=None, block_size=16):
    return fused_swa.fused_sliding_window_attention(q, k, v, window, q.shape[-1] ** -0.5, block_size, key_start)


def _kernels(window, sink):
    """name -> (document-masked kernel(q, k, v, key_start), plain kernel for one document alone)."""
    return {
        "causal-sdpa": (causal_attention, causal_attention_reference),
        "causal-reference": (
            lambda q, k, v, key_start: causal_attention_reference(q, k, v, key_start=key_start),
            causal_attention_reference,
        ),
        "window-dispatcher": (
            partial(sliding_window_attention, window=window),
            partial(sliding_window_attention_reference, window=window),
        ),
        "window-blocked": (
            lambda q, k, v, key_start: sliding_window_attention_blocked(
                q, k, v, window, block_size=8, key_start=key_start
            ),
            partial(sliding_window_attention_reference, window=window),
        ),
        "window-fused": (
            lambda q, k, v, key_start: fused(q, k, v, window, key_start),
            partial(sliding_window_attention_reference, window=window),
        ),
        "window-reference": (
            partial(sliding_window_attention_reference, window=window),
            partial(sliding_window_attention_reference, window=window),
        ),
        "sink-sdpa": (
            partial(sink_window_attention, window=window, sink=sink),
            partial(sink_window_attention_reference, window=window, sink=sink),
        ),
    }


def _qkv(b, hq, hkv, t, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(b, hq, t, d, generator=gen), *torch.randn(2, b, hkv, t, d, generator=gen)
    grad = torch.randn(b, hq, t, d, generator=gen)
    return q, k, v, grad


@pytest.mark.parametrize("window, sink", [(5, 2), (12, 3), (40, 1)])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2)])
def test_every_kernel_equals_each_document_run_alone(window, sink, hq, hkv):
    """Outputs and gradients of the packed, document-masked call equal those of each document run
    through the plain kernel on its own (the sinks being each document's first keys)."""
    tokens = packed_tokens([[7, 13, 3, 30, 11], [1, 25, 9, 2, 20]], seed=2)
    b, t = tokens.shape
    key_start = document_starts(tokens, EOD)
    q, k, v, grad = _qkv(b, hq, hkv, t, 8, seed=3)
    for name, (masked, alone) in _kernels(window, sink).items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = masked(*leaves, key_start=key_start)
        got = (out, *torch.autograd.grad(out, leaves, grad))
        for row in range(b):
            for start, stop in documents(tokens[row]):
                part = [x[row : row + 1, :, start:stop].clone().requires_grad_() for x in (q, k, v)]
                want = alone(*part)
                want_grads = torch.autograd.grad(want, part, grad[row : row + 1, :, start:stop])
                for what, g, w in zip(("out", "dq", "dk", "dv"), got, (want, *want_grads)):
                    assert_close(
                        g[row : row + 1, :, start:stop],
                        w,
                        **TOL,
                        msg=lambda m: f"{name} {what} row {row} document [{start}, {stop}): {m}",
                    )


@pytest.mark.parametrize("tq, window", [(20, 6), (20, 64), (9, 3)])
def test_a_chunk_with_its_earlier_keys_under_documents(tq, window):
    """The kernels' ``Tk > Tq`` form (a context-parallel chunk with the keys before it) with the chunk's
    document starts (:func:`key_starts`) equals those rows of the whole sequence's masked call."""
    tokens = packed_tokens([[11, 4, 30, 25], [40, 6, 30]], seed=4)
    b, t = tokens.shape
    doc_start = document_starts(tokens, EOD)
    q, k, v, _ = _qkv(b, 4, 2, t, 8, seed=5)
    for name, (masked, _) in _kernels(window, 2).items():
        whole = masked(q, k, v, key_start=doc_start)
        for key_first in (0, t - tq - window + 1):  # every earlier key (full attention), or a halo
            key_first = max(key_first, 0)
            chunk = slice(t - tq, t)
            part = masked(
                q[:, :, chunk],
                k[:, :, key_first:],
                v[:, :, key_first:],
                key_start=key_starts(doc_start, t - tq, tq, key_first),
            )
            if name.startswith(("causal", "sink")) and key_first:
                continue  # full and sink attention need every earlier key, not a halo
            assert_close(part, whole[:, :, chunk], **TOL, msg=lambda m: f"{name} from key {key_first}: {m}")


def test_a_document_boundary_outside_every_window_changes_nothing():
    """Without a boundary inside any window the masked call is the plain one, bit for bit (a block
    whose keys all lie in its rows' documents adds no mask)."""
    q, k, v, _ = _qkv(1, 2, 2, 64, 8, seed=6)
    key_start = torch.zeros(1, 64, dtype=torch.long)
    for kernel in (
        partial(sliding_window_attention_blocked, window=10, block_size=8),
        partial(fused, window=10),
    ):
        assert torch.equal(kernel(q, k, v, key_start=key_start), kernel(q, k, v))


def test_key_start_past_the_query_is_refused():
    q, k, v, _ = _qkv(1, 2, 2, 8, 4, seed=7)
    bad = torch.full((1, 8), 5, dtype=torch.long)
    with pytest.raises(ValueError, match="key_start"):
        sliding_window_attention(q, k, v, 4, key_start=bad)
    with pytest.raises(ValueError, match="int64"):
        causal_attention(q, k, v, key_start=bad.int())


def test_the_flex_attention_mask_is_the_document_band():
    """The CUDA path's ``mask_mod`` (evaluated on index grids here) is the reference's visible set."""
    tokens = packed_tokens([[6, 9, 20], [3, 14, 20]], seed=8)
    b, t = tokens.shape
    key_start = document_starts(tokens, EOD)
    mod = document_window_mask_mod(t, t, 7, key_start)
    batch = torch.arange(b)[:, None, None]
    q_idx = torch.arange(t)[None, :, None]
    kv_idx = torch.arange(t)[None, None, :]
    got = mod(batch, 0, q_idx, kv_idx)
    assert torch.equal(got, visible_keys(t, t, key_start, 7, 0, tokens.device)[:, 0])
