"""CPUAdamW computes what torch's AdamW computes on the same gradients.

CPUAdamW reads DDP's ``main_grad`` buffers, clips them by their global L2 norm and then runs torch's
fused AdamW over Megatron-style param groups (``lr_mult`` / ``wd_mult``). Compared here with the
reference (single-tensor) ``torch.optim.AdamW`` over several steps: unclipped, the parameters must
agree to float32 rounding; clipped, the reference first applies ``torch.nn.utils.clip_grad_norm_``
with the same limit, and both must report the same norm. One process, no model parallelism: every
parameter is marked tensor-parallel, as Megatron's parallel layers mark theirs, so each counts once.
"""

import math

import pytest
import torch

from megatron_ext.optim.cpu_optimizer import CPUAdamW

LR, BETAS, EPS, WEIGHT_DECAY = 1.0e-2, (0.9, 0.95), 1.0e-6, 0.1
SHAPES = {"weight": (8, 6), "bias": (8,), "norm": (6,), "output": (5, 8)}
# Megatron's grouping: decayed matrices, undecayed 1-D params, and a group with its own LR.
GROUPS = (
    {"names": ("weight",), "wd_mult": 1.0, "lr_mult": 1.0},
    {"names": ("bias", "norm"), "wd_mult": 0.0, "lr_mult": 1.0},
    {"names": ("output",), "wd_mult": 1.0, "lr_mult": 0.5},
)
STEPS = 6


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in SHAPES.items():
        param = torch.nn.Parameter(torch.randn(shape, generator=g))
        param.tensor_model_parallel = True
        params[name] = param
    return params


def gradients(steps, scale, seed=1):
    """Per step, a gradient per parameter; magnitudes vary by step so that clipping differs per step."""
    g = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(shape, generator=g) * scale * (1 + step) for name, shape in SHAPES.items()}
        for step in range(steps)
    ]


def cpu_adamw(params, clip_grad):
    groups = [
        {"params": [params[n] for n in group["names"]], "wd_mult": group["wd_mult"], "lr_mult": group["lr_mult"]}
        for group in GROUPS
    ]
    return CPUAdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS, clip_grad=clip_grad)


def reference_adamw(params):
    groups = [
        {
            "params": [params[n] for n in group["names"]],
            "lr": LR * group["lr_mult"],
            "weight_decay": WEIGHT_DECAY * group["wd_mult"],
        }
        for group in GROUPS
    ]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, foreach=False, fused=False)


def run_cpu_adamw(grads, clip_grad):
    params = make_params()
    optimizer = cpu_adamw(params, clip_grad)
    norms = []
    for step_grads in grads:
        for name, param in params.items():
            param.main_grad = step_grads[name].clone()  # what Megatron DDP fills
            param.grad = torch.full_like(param, float("nan"))  # must be ignored in favour of main_grad
        ok, norm, zeros = optimizer.step()
        assert ok and zeros is None
        assert all(param.grad is None for param in params.values())  # dropped after the step
        norms.append(norm)
    return params, norms, optimizer


def run_reference(grads, clip_grad=None):
    params = make_params()
    optimizer = reference_adamw(params)
    norms = []
    for step_grads in grads:
        for name, param in params.items():
            param.grad = step_grads[name].clone()
        if clip_grad is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), clip_grad)))
        optimizer.step()
        optimizer.zero_grad()
    return params, norms


def assert_params_close(got, want):
    for name in SHAPES:
        torch.testing.assert_close(got[name].detach(), want[name].detach(), rtol=1e-6, atol=1e-7, msg=name)


def test_unclipped_steps_equal_torch_adamw_over_param_groups():
    grads = gradients(STEPS, scale=0.1)
    got, norms, optimizer = run_cpu_adamw(grads, clip_grad=0.0)  # 0 disables clipping
    want, _ = run_reference(grads)
    assert_params_close(got, want)
    start = make_params()
    assert all(not torch.equal(got[n], start[n]) for n in SHAPES)  # the parameters did move
    for norm, step_grads in zip(norms, grads):  # the global L2 norm of the unclipped gradients
        expected = math.sqrt(sum(float(g.double().pow(2).sum()) for g in step_grads.values()))
        assert norm == pytest.approx(expected, rel=1e-12)
    assert [group["lr"] for group in optimizer.param_groups] == [LR, LR, LR * 0.5]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [WEIGHT_DECAY, 0.0, WEIGHT_DECAY]
    assert {float(s["step"]) for s in optimizer.optimizer.state.values()} == {float(STEPS)}


def test_a_norm_below_the_limit_is_not_clipped():
    grads = gradients(STEPS, scale=1.0e-3)
    got, norms, _ = run_cpu_adamw(grads, clip_grad=1.0)
    assert max(norms) < 1.0
    want, _ = run_reference(grads)
    assert_params_close(got, want)


def test_clipping_scales_as_clip_grad_norm():
    clip = 1.0
    grads = gradients(STEPS, scale=0.5)  # global norms from about 5 at the first step to 28 at the last
    got, norms, _ = run_cpu_adamw(grads, clip_grad=clip)
    want, ref_norms = run_reference(grads, clip_grad=clip)
    assert min(norms) > clip  # every step clipped, by a different factor
    assert norms == pytest.approx(ref_norms, rel=1e-6)  # the pre-clipping norm, as clip_grad_norm_ returns
    assert_params_close(got, want)
    unclipped, _ = run_reference(grads)
    diff = max(float((got[n] - unclipped[n]).abs().max()) for n in SHAPES)
    assert diff > 1e-3, "clipping must change the trajectory, or the comparison above proves nothing"


def test_a_nonfinite_norm_skips_the_update():
    params = make_params()
    optimizer = cpu_adamw(params, clip_grad=1.0)
    start = {name: param.detach().clone() for name, param in params.items()}
    for name, param in params.items():
        param.main_grad = torch.ones_like(param)
    params["bias"].main_grad[3] = float("inf")
    ok, norm, _ = optimizer.step()
    assert not ok and math.isinf(norm)
    assert all(torch.equal(params[n], start[n]) for n in SHAPES)
    assert all(param.grad is None for param in params.values())
    assert not optimizer.optimizer.state  # no Adam step was taken
