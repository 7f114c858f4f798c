"""Sliding-window attention kernels: the fused and blocked CPU kernels and the GPU path against the dense
reference."""

from functools import partial

import pytest
import torch
from torch.testing import assert_close

from megatron_ext.models import fused_swa
from megatron_ext.models.kernels import (
    causal_attention,
    ideal_flop_ratio,
    sink_window_attention,
    sink_window_attention_reference,
    sliding_window_attention,
    sliding_window_attention_blocked,
    sliding_window_attention_reference,
)

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
NAMES = ("out", "dq", "dk", "dv")


def make_qkv(b, hq, hkv, t, d, dtype=torch.float32, device="cpu", seed=0):
    """q [b, hq, t, d], k and v [b, hkv, t, d] that require grad, and an output gradient [b, hq, t, d]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=gen)
    k = torch.randn(b, hkv, t, d, generator=gen)
    v = torch.randn(b, hkv, t, d, generator=gen)
    grad = torch.randn(b, hq, t, d, generator=gen)
    q, k, v = (x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v))
    return q, k, v, grad.to(device=device, dtype=dtype)


def forward_backward(fn, q, k, v, grad):
    """(out, dq, dk, dv) of ``fn(q, k, v)`` for the output gradient ``grad``."""
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def assert_all_close(got, want, what=""):
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, **FP32_TOL, msg=lambda m: f"{name}{what}: {m}")


# (b, hq, hkv, T, d, window, block_size)
SHAPES = [
    pytest.param(1, 2, 2, 128, 16, 24, 32, id="T-multiple-of-block"),
    pytest.param(1, 2, 2, 100, 16, 24, 32, id="T-not-multiple-of-block"),
    pytest.param(1, 2, 2, 70, 8, 1, 16, id="W1"),
    pytest.param(1, 2, 2, 90, 8, 5, 16, id="W-smaller-than-block"),
    pytest.param(1, 2, 2, 96, 8, 17, 16, id="W-one-past-block"),
    pytest.param(2, 4, 2, 96, 16, 20, 16, id="GQA-4-2-batch2"),
    pytest.param(1, 8, 2, 131, 8, 40, 24, id="GQA-8-2"),
    pytest.param(1, 3, 3, 75, 8, 75, 32, id="W-equals-T"),
    pytest.param(1, 2, 1, 50, 8, 1000, 16, id="W-beyond-T"),
]


def fused(q, k, v, window, scale=None, block_size=16):
    """The fused C++ kernel with the dispatcher's defaults (built on first use)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return fused_swa.fused_sliding_window_attention(q, k, v, window, scale, block_size)


BLOCK_KERNELS = {"blocked": sliding_window_attention_blocked, "fused": fused}


def test_the_fused_kernel_builds_here():
    """The project's machines have a C++ compiler and ninja: the fused kernel must build, not fall back."""
    assert fused_swa.fused_kernel_error() is None


@pytest.mark.parametrize("kernel", BLOCK_KERNELS)
@pytest.mark.parametrize("b, hq, hkv, t, d, window, block", SHAPES)
def test_block_kernels_match_reference(kernel, b, hq, hkv, t, d, window, block):
    q, k, v, grad = make_qkv(b, hq, hkv, t, d)
    blocked = partial(BLOCK_KERNELS[kernel], window=window, block_size=block)
    got = forward_backward(blocked, q, k, v, grad)
    want = forward_backward(partial(sliding_window_attention_reference, window=window), q, k, v, grad)
    assert_all_close(got, want)
    if window >= t:
        assert_all_close(got, forward_backward(causal_attention, q, k, v, grad), " vs causal")


# (Tq, window, block): the last Tq queries of 60 keys, as a context-parallel chunk with the keys before it
CHUNKS = [(12, 5, 4), (12, 20, 8), (12, 60, 5), (20, 1, 3), (7, 13, 80)]


@pytest.mark.parametrize("tq, window, block", CHUNKS)
def test_a_chunk_with_its_earlier_keys_equals_those_rows_of_the_whole_sequence(tq, window, block):
    """Tk > Tq: queries are the last Tq positions, the causal (and window, sink) mask aligned bottom right.
    Outputs and gradients equal the whole-sequence attention's at those rows."""
    t = 60
    q, k, v, grad = make_qkv(2, 4, 2, t, 8, seed=5)
    rows = slice(t - tq, t)
    grad = grad.clone()
    grad[:, :, : t - tq] = 0  # the whole sequence's rows before the chunk contribute no gradient
    kernels = {
        "causal": causal_attention,
        "blocked": partial(sliding_window_attention_blocked, window=window, block_size=block),
        "fused": partial(fused, window=window, block_size=block),
        "reference": partial(sliding_window_attention_reference, window=window),
        "sink": partial(sink_window_attention, window=window, sink=3),
        "sink-reference": partial(sink_window_attention_reference, window=window, sink=3),
    }
    for name, kernel in kernels.items():
        whole = forward_backward(kernel, q, k, v, grad)  # Tq == Tk: the plain causal / window mask
        chunk_q = q.detach()[:, :, rows].clone().requires_grad_()
        out, dq, dk, dv = forward_backward(kernel, chunk_q, k, v, grad[:, :, rows])
        assert_all_close(
            (out, dq, dk, dv), (whole[0][:, :, rows], whole[1][:, :, rows], whole[2], whole[3]), f" ({name})"
        )


def test_dispatcher_default_block_and_custom_scale():
    q, k, v, grad = make_qkv(1, 4, 2, 333, 32, seed=1)
    got = forward_backward(partial(sliding_window_attention, window=100, scale=0.3), q, k, v, grad)
    want = forward_backward(partial(sliding_window_attention_reference, window=100, scale=0.3), q, k, v, grad)
    assert_all_close(got, want)
    got = forward_backward(partial(sliding_window_attention_blocked, window=100, scale=0.3), q, k, v, grad)
    assert_all_close(got, want)


@pytest.mark.parametrize("kernel", BLOCK_KERNELS)
def test_block_kernels_accept_non_contiguous_inputs(kernel):
    q, k, v, grad = make_qkv(1, 2, 2, 64, 8, seed=2)
    # The same values stored as [b, s, h, d] and seen as [b, h, s, d]; the output gradient too.
    strided = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    strided_grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided[0].is_contiguous() and not strided_grad.is_contiguous()
    got = forward_backward(partial(BLOCK_KERNELS[kernel], window=9, block_size=16), *strided, strided_grad)
    want = forward_backward(partial(sliding_window_attention_reference, window=9), q, k, v, grad)
    assert_all_close(got, want)
    if kernel == "fused":  # read in place, written in the inputs' layout: the caller's permutes stay views
        assert got[0].stride() == strided[0].stride() and got[2].stride() == strided[1].stride()


@pytest.mark.parametrize("kernel", ["reference", "blocked", "fused"])
def test_window_convention(kernel):
    """W = 3: changing key and value j changes exactly the outputs i with i - 2 <= j <= i."""
    window, t = 3, 12
    fn = {
        "reference": partial(sliding_window_attention_reference, window=window),
        "blocked": partial(sliding_window_attention_blocked, window=window, block_size=4),
        "fused": partial(fused, window=window, block_size=4),
    }[kernel]
    q, k, v, _ = make_qkv(1, 1, 1, t, 4)
    q, k, v = q.detach(), k.detach(), v.detach()
    base = fn(q, k, v)
    for j in range(t):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 1.0
        v2[:, :, j] += 1.0
        changed = (fn(q, k2, v2) - base).abs().amax(dim=(0, 1, 3)) > 1e-6  # [T]
        expected = torch.tensor([j <= i <= j + window - 1 for i in range(t)])
        rows = changed.nonzero().flatten().tolist()
        assert torch.equal(changed, expected), f"perturbing position {j} changed rows {rows}"


def test_dispatcher_on_cpu_takes_the_fused_kernel_for_fp32_and_the_blocked_one_otherwise(monkeypatch):
    q, k, v, grad = make_qkv(2, 4, 2, 150, 16, seed=3)
    got = forward_backward(partial(sliding_window_attention, window=33), q, k, v, grad)
    want = forward_backward(partial(fused, window=33, block_size=80), q, k, v, grad)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    low = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    got = forward_backward(partial(sliding_window_attention, window=33), *low, grad.bfloat16())
    want = forward_backward(partial(sliding_window_attention_blocked, window=33), *low, grad.bfloat16())
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # Where the extension cannot be built: one warning naming the reason, then the blocked kernel.
    monkeypatch.setattr(fused_swa, "_load", lambda: (None, "OSError: no compiler"))
    fused_swa._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="could not be built .OSError: no compiler.*g\\+\\+") as record:
        got = forward_backward(partial(sliding_window_attention, window=33), q, k, v, grad)
        sliding_window_attention(q, k, v, window=33)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    want = forward_backward(partial(sliding_window_attention_blocked, window=33), q, k, v, grad)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    fused_swa._warn_fallback.cache_clear()


def test_fused_kernel_refuses_what_it_does_not_compute():
    q, k, v, _ = make_qkv(1, 2, 2, 16, 8)
    with pytest.raises(ValueError, match="float32 CPU"):
        fused(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4)
    with pytest.raises(ValueError, match="block_size"):
        fused(q, k, v, 4, block_size=0)


def test_blocked_bf16_close_to_fp32_reference():
    q, k, v, grad = make_qkv(1, 4, 2, 160, 32, seed=4)
    want = forward_backward(partial(sliding_window_attention_reference, window=48), q, k, v, grad)
    low = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    blocked = partial(sliding_window_attention_blocked, window=48, block_size=32)
    got = forward_backward(blocked, *low, grad.bfloat16())
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.bfloat16
        assert (g.float() - w).norm() <= 2e-2 * w.norm(), name


@pytest.mark.parametrize("t, window", [(1, 1), (5, 1), (5, 2), (5, 5), (5, 9), (4096, 512), (100, 37)])
def test_ideal_flop_ratio(t, window):
    band = sum(min(i + 1, window) for i in range(t))
    assert ideal_flop_ratio(t, window) == pytest.approx(band / (t * (t + 1) / 2), rel=1e-12)


def test_input_validation():
    q, k, v, _ = make_qkv(1, 4, 2, 8, 4)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention_blocked(q, k, v, 0)
    with pytest.raises(ValueError, match="multiple"):
        sliding_window_attention_reference(q, k[:, :1].expand(1, 3, 8, 4), v[:, :1].expand(1, 3, 8, 4), 2)
    with pytest.raises(ValueError, match="block_size"):
        sliding_window_attention_blocked(q, k, v, 2, block_size=0)
    with pytest.raises(ValueError, match="fewer positions than q"):
        causal_attention(q, k[:, :, :4], v[:, :, :4])


# ---- the fused kernel's mixed layers: a window per KV head, and full + window in one pass ----------


def _per_head_reference(q, k, v, windows, key_start=None):
    """Each query head through the masked reference with its KV head's window (``FULL``: every key)."""
    group = q.shape[1] // k.shape[1]
    heads = []
    for h in range(q.shape[1]):
        kv = slice(h // group, h // group + 1)
        window = k.shape[2] if windows[h // group] == fused_swa.FULL else windows[h // group]
        heads.append(
            sliding_window_attention_reference(q[:, h : h + 1], k[:, kv], v[:, kv], window, key_start=key_start)
        )
    return torch.cat(heads, dim=1)


def _documents(b, t, seed):
    """key_start [b, t] of random documents (each query's first visible key)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.zeros(b, t, dtype=torch.long)
    for row in range(b):
        for boundary in sorted(torch.randint(1, t, (3,), generator=gen).tolist()):
            starts[row, boundary:] = boundary
    return starts


# (b, hq, hkv, Tq, Tk, windows per KV head, block)
MIXED = [
    pytest.param(1, 4, 4, 100, 100, [0, 9, 0, 9], 16, id="alternating"),
    pytest.param(2, 8, 4, 75, 75, [1, 0, 30, 0], 32, id="GQA-W1-W-beyond-block"),
    pytest.param(1, 6, 3, 50, 50, [0, 0, 200], 16, id="W-beyond-T"),
    pytest.param(1, 4, 2, 20, 60, [7, 0], 8, id="chunk-Tk-beyond-Tq"),
    pytest.param(1, 2, 2, 40, 40, [5, 5], 16, id="uniform-list"),
]


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("b, hq, hkv, tq, tk, windows, block", MIXED)
def test_a_window_per_kv_head_matches_each_heads_reference(b, hq, hkv, tq, tk, windows, block, documents):
    q, k, v, grad = make_qkv(b, hq, hkv, tk, 8, seed=6)
    q = q.detach()[:, :, tk - tq :].clone().requires_grad_()  # the last Tq positions
    grad = grad[:, :, tk - tq :]
    key_start = _documents(b, tk, seed=7)[:, tk - tq :] if documents else None
    scale = q.shape[-1] ** -0.5

    def mixed(q, k, v, windows=windows):
        return fused_swa.fused_sliding_window_attention(q, k, v, windows, scale, block, key_start)

    got = forward_backward(mixed, q, k, v, grad)
    want = forward_backward(partial(_per_head_reference, windows=windows, key_start=key_start), q, k, v, grad)
    assert_all_close(got, want)
    if len(set(windows)) == 1:  # a list of one window is that window
        assert_all_close(got, forward_backward(partial(mixed, windows=windows[0]), q, k, v, grad))


def test_the_fused_kernels_results_do_not_depend_on_the_thread_count():
    """Work is assigned to threads by cost; each (batch, KV head)'s arithmetic is the same on any thread."""
    q, k, v, grad = make_qkv(2, 6, 3, 90, 16, seed=8)
    threads = torch.get_num_threads()

    def both_modes():
        mixed = forward_backward(partial(fused, window=[0, 4, 33], block_size=16), q, k, v, grad)
        full, window = fused_swa.fused_full_and_window_attention(q, k, v, 11, 0.25, 16)
        return (*mixed, full, window, *torch.autograd.grad((full, window), (q, k, v), (grad, -grad)))

    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(both_modes())
    finally:
        torch.set_num_threads(threads)
    for n, result in zip((2, 3), results[1:]):
        for i, (a, b) in enumerate(zip(results[0], result)):
            assert torch.equal(a, b), f"result {i} differs between 1 and {n} threads"


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("b, hq, hkv, tq, tk, window, block", [(2, 4, 2, 70, 70, 9, 16), (1, 4, 4, 30, 50, 12, 8)])
def test_full_and_window_in_one_pass_equal_the_two_kernels(b, hq, hkv, tq, tk, window, block, documents):
    """Dual mode: both outputs, and the gradients of any mixture of them (a gate's included), as the
    full causal and the sliding-window references give them."""
    q, k, v, grad = make_qkv(b, hq, hkv, tk, 8, seed=9)
    q = q.detach()[:, :, tk - tq :].clone().requires_grad_()
    grad = grad[:, :, tk - tq :]
    key_start = _documents(b, tk, seed=10)[:, tk - tq :] if documents else None
    z = torch.rand(1, hq, 1, 1, generator=torch.Generator().manual_seed(11)).requires_grad_()
    full, swa = fused_swa.fused_full_and_window_attention(q, k, v, window, 0.3, block, key_start)
    ref_full = sliding_window_attention_reference(q, k, v, tk, 0.3, key_start=key_start)
    ref_swa = sliding_window_attention_reference(q, k, v, window, 0.3, key_start=key_start)
    assert_close(full, ref_full, **FP32_TOL)
    assert_close(swa, ref_swa, **FP32_TOL)
    got = torch.autograd.grad(torch.lerp(swa, full, z), (q, k, v, z), grad)
    want = torch.autograd.grad(torch.lerp(ref_swa, ref_full, z), (q, k, v, z), grad, retain_graph=True)
    for name, g, w in zip(("dq", "dk", "dv", "dz"), got, want):
        assert_close(g, w, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")
    # One output alone: the other's gradient is zero.
    full, swa = fused_swa.fused_full_and_window_attention(q, k, v, window, 0.3, block, key_start)
    got = torch.autograd.grad(swa, (q, k, v), grad)
    want = torch.autograd.grad(ref_swa, (q, k, v), grad)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, **FP32_TOL, msg=lambda m: f"window only, {name}: {m}")


def test_mixed_and_dual_calls_count_their_flops_by_the_models_convention():
    """A full head counts the Tq x Tk square (as FlopCounterMode counts SDPA), a window head the pairs its
    band's blocks multiply; the dual mode counts both bands."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_ext.models.kernels import window_kernel_pairs

    b, hq, hkv, t, d, block = 2, 4, 2, 64, 8, 16
    q, k, v, _ = make_qkv(b, hq, hkv, t, d)
    band = window_kernel_pairs(t, 10, block)
    per_head = {"mixed": (t * t + band) / 2, "dual": t * t + band}  # averaged over the 2 KV heads
    calls = {
        "mixed": lambda: fused(q, k, v, [fused_swa.FULL, 10], block_size=block),
        "dual": lambda: fused_swa.fused_full_and_window_attention(q, k, v, 10, 0.3, block),
    }
    for name, call in calls.items():
        with FlopCounterMode(display=False) as counter:
            call()
        assert counter.get_total_flops() == 4 * d * b * hq * per_head[name], name


def test_fused_windows_are_checked():
    q, k, v, _ = make_qkv(1, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="3 windows for 2 KV heads"):
        fused(q, k, v, [4, 4, 4])
    with pytest.raises(ValueError, match="window=0 must be >= 1"):
        fused_swa.fused_full_and_window_attention(q, k, v, 0, 0.3, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq, hkv, t, window", [(4, 4, 256, 64), (4, 2, 300, 100), (2, 1, 200, 500)])
def test_flex_path_matches_reference_on_cuda(dtype, tol, hq, hkv, t, window):
    q, k, v, grad = make_qkv(2, hq, hkv, t, 64, dtype=dtype, device="cuda", seed=5)
    got = forward_backward(partial(sliding_window_attention, window=window), q, k, v, grad)
    exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = forward_backward(partial(sliding_window_attention_reference, window=window), *exact, grad.float())
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == dtype
        rel = ((g.float() - w).norm() / w.norm()).item()
        assert rel <= tol, f"{name}: relative error {rel:.2e} > {tol:.0e}"


# ---- sink + recent attention (the LoZA baseline's sparse pattern) ----------------------------------


def _sink_window_by_loops(q, k, v, window, sink, scale):
    """Query by query, over the explicit list of visible keys."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for i in range(q.shape[2]):
        keys = sorted({j for j in range(i + 1) if j < sink or j >= i - window + 1})
        kk = k[:, :, keys].repeat_interleave(group, dim=1)
        vv = v[:, :, keys].repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("bhd,bhkd->bhk", q[:, :, i], kk) * scale, dim=-1)
        out[:, :, i] = torch.einsum("bhk,bhkd->bhd", weights, vv)
    return out


@pytest.mark.parametrize("window, sink", [(4, 2), (3, 1), (8, 5), (40, 3)])
def test_sink_window_attention_sees_the_sinks_and_the_recent_keys(window, sink):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k2, v2 = k[:, :2].detach().requires_grad_(), v[:, :2].detach().requires_grad_()  # GQA: 2 KV heads
    want = _sink_window_by_loops(q, k2, v2, window, sink, 0.3)
    ref = torch.autograd.grad(want.square().sum(), (q, k2, v2))
    for fn in (sink_window_attention, sink_window_attention_reference):
        got = fn(q, k2, v2, window, sink, 0.3)
        assert_close(got, want.detach())
        for g, r in zip(torch.autograd.grad(got.square().sum(), (q, k2, v2)), ref):
            assert_close(g, r)


def test_sink_window_reduces_to_sliding_window_and_to_causal():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    assert_close(sink_window_attention(q, k, v, 5, 0), sliding_window_attention_reference(q, k, v, 5))
    assert_close(sink_window_attention(q, k, v, 20, 3), causal_attention(q, k, v))
    # The last query sees key 0 through the sink only.
    k_changed = k.clone()
    k_changed[:, :, 0] += 1.0
    assert not torch.allclose(
        sink_window_attention(q, k, v, 5, 1)[:, :, -1], sink_window_attention(q, k_changed, v, 5, 1)[:, :, -1]
    )
    assert torch.equal(
        sink_window_attention(q, k, v, 5, 0)[:, :, -1], sink_window_attention(q, k_changed, v, 5, 0)[:, :, -1]
    )


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    """torch waits forever on its build lock; one older than any build is a killed build's."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.write_text("")
    fused_swa._remove_stale_lock(str(tmp_path))
    assert lock.exists()  # a build may be running
    old = time.time() - fused_swa.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="did not finish"):
        fused_swa._remove_stale_lock(str(tmp_path))
    assert not lock.exists()
    fused_swa._remove_stale_lock(str(tmp_path))  # no lock: nothing to do
