"""ConSA hard-concrete gates and the augmented-Lagrangian SWA-fraction controller.

``pytest -s`` shows the convergence trajectory of the controller test.
"""

import io
import math

import pytest
import torch

from megatron_ext.config import ConfigError, from_dict
from megatron_ext.consa.config import HardConcreteConfig, HybridAttentionConfig
from megatron_ext.consa.constraint import LagrangianController
from megatron_ext.consa.gates import HardConcreteGates
from megatron_ext.run import RunConfig


def controller(num_layers, *, target, mode="global", warmup_steps=0, lambda_lr=1.0):
    """A controller with the hybrid_attention section's constraint fields set explicitly."""
    return LagrangianController(
        HybridAttentionConfig(target=target, constraint=mode, target_warmup_steps=warmup_steps, lambda_lr=lambda_lr),
        num_layers,
    )


def gates_with(log_alpha) -> HardConcreteGates:
    log_alpha = torch.as_tensor(log_alpha, dtype=torch.float32)
    gates = HardConcreteGates(*log_alpha.shape)
    with torch.no_grad():
        gates.log_alpha.copy_(log_alpha)
    return gates


# ---- (1) expected L0 against Monte Carlo ------------------------------------------------------


def test_prob_nonzero_matches_monte_carlo():
    values = [-3.0, -1.0, -0.5, 0.0, 1.0, 3.0]
    num_samples = 200_000
    # Each row is an independent draw of the same six gates: [num_samples, 6].
    gates = gates_with(torch.tensor(values).expand(num_samples, -1))
    torch.manual_seed(1234)
    with torch.no_grad():
        z = gates.sample()
    assert z.min() == 0.0 and z.max() == 1.0, "the stretch must give exact zeros and ones"
    frequency = (z != 0).double().mean(dim=0)
    expected = gates.prob_nonzero()[0].double()
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    closed_form = torch.tensor([1 / (1 + math.exp(-(v - beta * math.log(-gamma / zeta)))) for v in values])
    torch.testing.assert_close(expected, closed_form.double(), rtol=0, atol=1e-6)
    std_error = (expected * (1 - expected) / num_samples).sqrt()
    for v, f, p, se in zip(values, frequency.tolist(), expected.tolist(), std_error.tolist()):
        assert abs(f - p) <= max(3 * se, 0.005), f"log_alpha={v}: Monte Carlo {f:.4f} vs P(z != 0) = {p:.4f}"


def test_sample_is_differentiable_and_forward_follows_the_mode():
    gates = HardConcreteGates(2, 3, HardConcreteConfig(init_mean=0.0, init_std=0.5))
    z = gates.sample()
    assert z.shape == (2, 3)
    z.sum().backward()
    assert gates.log_alpha.grad is not None and torch.isfinite(gates.log_alpha.grad).all()
    gates.train()
    torch.manual_seed(0)
    first = gates()
    torch.manual_seed(0)
    torch.testing.assert_close(first, gates.sample(), rtol=0, atol=0)
    gates.eval()
    torch.testing.assert_close(gates(), gates.deterministic(), rtol=0, atol=0)


# ---- (2) deterministic gate, clamping, initialisation, validation -----------------------------


def test_deterministic_gate_formula():
    values = [-4.0, -1.0, 0.0, 0.3, 1.0, 4.0]
    z = gates_with([values]).deterministic()[0]

    def expected(v, beta=2 / 3, gamma=-0.1, zeta=1.1):
        s = 1 / (1 + math.exp(-v / beta * 0.8))
        return min(1.0, max(0.0, s * (zeta - gamma) + gamma))

    torch.testing.assert_close(z, torch.tensor([expected(v) for v in values]), rtol=0, atol=1e-6)
    # sigmoid(0) = 1/2 -> 0.5 * 1.2 - 0.1 = 0.5; large |log_alpha| saturates the hard sigmoid.
    assert z[2].item() == pytest.approx(0.5, abs=1e-7)
    assert z[0].item() == 0.0 and z[-1].item() == 1.0


def test_clamp_bounds_log_alpha_and_forward_does_not():
    low, high = math.log(1e-2), math.log(1e2)
    gates = gates_with([[-10.0, -1.0, 0.0, 2.0, 10.0]])
    before = gates.prob_nonzero()
    gates.clamp_()
    torch.testing.assert_close(
        gates.log_alpha.detach()[0], torch.tensor([low, -1.0, 0.0, 2.0, high]), rtol=0, atol=1e-6
    )
    after = gates.prob_nonzero()
    assert after[0, 4] < before[0, 4] and after[0, 0] > before[0, 0]
    torch.testing.assert_close(after[0, 1:4], before[0, 1:4], rtol=0, atol=0)


def test_initialisation_is_normal_with_mean_5_and_std_0p01():
    torch.manual_seed(7)
    log_alpha = HardConcreteGates(500, 40).log_alpha.detach().double()  # 20k draws
    assert log_alpha.shape == (500, 40)
    assert abs(log_alpha.mean().item() - 5.0) < 5e-4  # standard error 7e-5
    assert abs(log_alpha.std().item() - 0.01) < 5e-4  # relative standard error 0.5%
    custom = HardConcreteGates(100, 100, HardConcreteConfig(init_mean=-1.0, init_std=0.1)).log_alpha.detach()
    assert abs(custom.mean().item() + 1.0) < 0.01 and abs(custom.std().item() - 0.1) < 0.005


def test_configs_reject_bad_values_naming_yaml_path_value_and_rule():
    bad_gates = dict(beta=0.0, gamma=0.1, zeta=1.0, eps=0.0, init_std=-1.0, log_alpha_max=-5.0)
    with pytest.raises(ConfigError) as info:
        HardConcreteConfig(**bad_gates)
    assert {p.split("=")[0] for p in info.value.problems} == set(bad_gates)
    with pytest.raises(ConfigError) as info:  # through the loader: problems carry their YAML path
        from_dict(
            RunConfig,
            {
                "hybrid_attention": {
                    "hard_concrete": bad_gates,
                    "target": 1.5,
                    "lambda_lr": 0.0,
                    "target_warmup_steps": -1,
                }
            },
        )
    message = str(info.value)
    for name in bad_gates:
        assert f"hybrid_attention.hard_concrete.{name}={bad_gates[name]}" in message
    assert "use a number < 0 (P(z = 0) > 0 needs it)" in message
    with pytest.raises(ConfigError) as info:
        from_dict(
            RunConfig,
            {"hybrid_attention": {"target": 1.5, "lambda_lr": 0.0, "target_warmup_steps": -1, "constraint": "both"}},
        )
    message = str(info.value)
    assert "hybrid_attention.constraint='both' is not allowed: use one of 'global' | 'per_layer'" in message
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, {"hybrid_attention": {"target": 1.5, "lambda_lr": 0.0, "target_warmup_steps": -1}})
    message = str(info.value)
    assert "hybrid_attention.target=1.5 must be in [0.0, 1.0]" in message
    assert "hybrid_attention.lambda_lr=0.0 must be positive" in message
    assert "hybrid_attention.target_warmup_steps=-1 must be >= 0" in message
    with pytest.raises(ValueError, match="units_per_layer=0"):
        HardConcreteGates(2, 0)


# ---- controller arithmetic --------------------------------------------------------------------


def test_target_warms_up_linearly():
    ctrl = controller(2, target=0.5, warmup_steps=100)
    assert [ctrl.target_at(s) for s in (0, 50, 100, 400)] == [0.0, 0.25, 0.5, 0.5]
    assert controller(2, target=0.5).target_at(0) == 0.5


def test_constraint_loss_value_gradients_and_ascent():
    ctrl = controller(3, target=0.5, lambda_lr=0.1)
    with torch.no_grad():
        ctrl.lambda1.fill_(2.0)
        ctrl.lambda2.fill_(3.0)
    rho_hat = torch.tensor(0.7, requires_grad=True)
    loss = ctrl.constraint_loss(rho_hat, step=10)
    assert loss.item() == pytest.approx(2 * 0.2 + 3 * 0.04)
    loss.backward()
    assert rho_hat.grad.item() == pytest.approx(2 + 2 * 3 * 0.2)
    ctrl.ascent_step()  # lambda += lr * dL/dlambda: (0.2, 0.04)
    assert ctrl.lambda1.item() == pytest.approx(2.02) and ctrl.lambda2.item() == pytest.approx(3.004)
    assert ctrl.lambda1.grad is None and ctrl.lambda2.grad is None
    with pytest.raises(ValueError, match=r"needs \(\)"):
        ctrl.constraint_loss(torch.zeros(3), step=0)

    per_layer = controller(3, target=0.5, mode="per_layer")
    assert per_layer.lambda1.shape == (3,)
    with torch.no_grad():
        per_layer.lambda1.copy_(torch.tensor([1.0, 2.0, 3.0]))
    gap = torch.tensor([0.1, -0.2, 0.3])
    loss = per_layer.constraint_loss(0.5 + gap, step=0)
    assert loss.item() == pytest.approx(1 * 0.1 + 2 * -0.2 + 3 * 0.3)


# ---- (3) the controller drives the expected SWA fraction to the target ------------------------


@pytest.mark.parametrize("mode, rho", [("global", 0.5), ("per_layer", 0.75)])
def test_controller_reaches_the_target_swa_fraction(mode, rho):
    """4 layers x 4 KV-head units; the stand-in LM loss rewards open gates (full attention), some
    units more than others, so only the constraint closes gates. AdamW descends on log_alpha,
    ``ascent_step`` ascends on the multipliers."""
    torch.manual_seed(0)
    num_layers, heads, steps = 4, 4, 600
    gates = HardConcreteGates(num_layers, heads)
    ctrl = controller(num_layers, target=rho, mode=mode, warmup_steps=100, lambda_lr=0.5)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=0.1, weight_decay=0.0)
    benefit = torch.linspace(0.2, 1.0, num_layers * heads).view(num_layers, heads)  # FA gain per unit
    print(f"\n{mode}, rho={rho}: step  rho_t  rho_hat  constraint_loss  lambda1")
    for step in range(1, steps + 1):
        z = gates()  # [4, 4] sample (training mode)
        lm_loss = -(benefit * z).mean()
        constraint = ctrl.constraint_loss(gates.expected_swa_fraction(mode), step)
        (lm_loss + constraint).backward()
        optimizer.step()
        optimizer.zero_grad()
        gates.clamp_()
        ctrl.ascent_step()
        if step % 50 == 0:
            with torch.no_grad():
                rho_hat = gates.expected_swa_fraction(mode)
            print(
                f"  {step:4d}  {ctrl.target_at(step):.3f}  {fmt(rho_hat)}  {constraint.item():+.4f}  "
                f"{fmt(ctrl.lambda1.detach())}"
            )

    with torch.no_grad():
        rho_hat = gates.expected_swa_fraction(mode)
    assert rho_hat.shape == (() if mode == "global" else (num_layers,))
    assert (rho_hat - rho).abs().max().item() <= 0.02, f"rho_hat={rho_hat.tolist()} vs target {rho}"
    full = gates.binarize(rho, mode)
    if mode == "global":
        # The units that gain most from full attention keep it.
        assert benefit[full].mean() > benefit[~full].mean()


def fmt(t: torch.Tensor) -> str:
    return " ".join(f"{v:.4f}" for v in t.flatten().tolist())


# ---- (4) binarization -------------------------------------------------------------------------


def swa_by_rank(log_alpha, k):
    """Indices of the k lowest values, ties by index: an independent reference for ``binarize``."""
    return set(sorted(range(len(log_alpha)), key=lambda i: (log_alpha[i], i))[:k])


def test_binarize_global_takes_the_exact_count_with_the_lowest_log_alpha():
    values = [[3.0, 1.0, 1.0, 2.0], [0.5, 1.0, 4.0, -1.0], [2.0, 2.0, 0.0, 3.0], [1.0, 4.0, 4.0, 4.0]]
    gates = gates_with(values)
    full = gates.binarize(0.3, "global")  # round(0.3 * 16) = round(4.8) = 5 SWA units
    assert full.dtype == torch.bool and full.shape == (4, 4)
    # -1.0 (7), 0.0 (10), 0.5 (4), then the 1.0 ties by index: 1, 2 (5 and 12 stay full attention).
    assert sorted(torch.nonzero(~full.flatten()).flatten().tolist()) == [1, 2, 4, 7, 10]

    torch.manual_seed(3)
    gates = gates_with(torch.randn(4, 4).round(decimals=1))  # rounding creates ties
    flat = gates.log_alpha.detach().flatten().tolist()
    for rho in [i / 10 for i in range(11)]:
        full = gates.binarize(rho, "global").flatten()
        k = round(rho * 16)
        assert int((~full).sum()) == k
        assert set(torch.nonzero(~full).flatten().tolist()) == swa_by_rank(flat, k)
    assert gates.binarize(0.0).all() and not gates.binarize(1.0).any()


def test_binarize_per_layer_takes_the_exact_count_in_every_layer():
    values = [[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [-4.0, 4.0, -3.0, 0.0]]
    full = gates_with(values).binarize(0.5, "per_layer")  # 2 SWA heads per layer
    assert full.tolist() == [[True, False, True, False], [False, False, True, True], [False, True, False, True]]

    torch.manual_seed(4)
    gates = gates_with(torch.randn(5, 8).round(decimals=1))
    for rho in (0.1, 0.25, 0.6, 0.9):
        full = gates.binarize(rho, "per_layer")
        k = round(rho * 8)
        for layer, row in enumerate(gates.log_alpha.detach().tolist()):
            assert set(torch.nonzero(~full[layer]).flatten().tolist()) == swa_by_rank(row, k)
    # Python's round halves to even: 0.125 * 4 = 0.5 -> 0 and 0.375 * 4 = 1.5 -> 2.
    gates = gates_with([[0.0, 1.0, 2.0, 3.0]])
    assert int((~gates.binarize(0.125, "per_layer")).sum()) == 0
    assert int((~gates.binarize(0.375, "per_layer")).sum()) == 2


def test_binarize_by_sign_ignores_the_target():
    """ConSA's stated rule (hybrid_attention.binarize: sign): full attention iff log_alpha > 0, at any
    target and either constraint mode; the exact-target rule meets the target instead."""
    values = [[3.0, -1.0, 0.0, 2.0], [-0.5, -2.0, 4.0, -3.0]]
    gates = gates_with(values)
    expected = [[True, False, False, True], [False, False, True, False]]
    for rho in (0.0, 0.25, 0.5, 1.0):
        for mode in ("global", "per_layer"):
            assert gates.binarize(rho, mode, "sign").tolist() == expected
    assert int((~gates.binarize(0.25, "global")).sum()) == 2  # exact target: 2 of 8, not the sign's 5
    with pytest.raises(ValueError, match="rule='nearest'"):
        gates.binarize(0.5, "global", "nearest")


# ---- (5) state_dict round trip ----------------------------------------------------------------


def round_trip(module: torch.nn.Module) -> dict:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("mode", ["global", "per_layer"])
def test_state_dict_round_trip_restores_log_alpha_and_lambdas(mode):
    torch.manual_seed(11)
    gates = HardConcreteGates(3, 4)
    with torch.no_grad():
        gates.log_alpha.normal_()
    ctrl = controller(3, target=0.4, mode=mode, warmup_steps=5)
    for step in range(1, 4):
        ctrl.constraint_loss(gates.expected_swa_fraction(mode), step).backward()
        ctrl.ascent_step()
    assert ctrl.lambda1.detach().abs().min() > 0 and ctrl.lambda2.detach().abs().min() > 0

    torch.manual_seed(12)
    new_gates = HardConcreteGates(3, 4)
    new_ctrl = controller(3, target=0.4, mode=mode, warmup_steps=5)
    new_gates.load_state_dict(round_trip(gates))
    new_ctrl.load_state_dict(round_trip(ctrl))
    assert set(new_gates.state_dict()) == {"log_alpha"}
    assert set(new_ctrl.state_dict()) == {"lambda1", "lambda2"}
    assert torch.equal(new_gates.log_alpha, gates.log_alpha)
    assert torch.equal(new_ctrl.lambda1, ctrl.lambda1) and torch.equal(new_ctrl.lambda2, ctrl.lambda2)


# ---- rank-consistent noise, E[z], diagnostics ---------------------------------------------------


def test_step_noise_depends_only_on_seed_step_and_layer():
    gates = HardConcreteGates(3, 4, HardConcreteConfig(init_mean=0.0), noise_seed=7)
    other = HardConcreteGates(3, 4, HardConcreteConfig(init_mean=0.0), noise_seed=7)
    with torch.no_grad():
        other.log_alpha.copy_(gates.log_alpha)
    torch.rand(1000)  # whatever else consumed the default generator
    full = gates.sample(step=5)
    assert torch.equal(full, other.sample(step=5))
    assert all(torch.equal(full[layer], gates.sample(step=5, layer=layer)) for layer in range(3))
    assert not torch.equal(full, gates.sample(step=6))
    assert not torch.equal(gates.noise(5, 0), gates.noise(5, 1))
    assert not torch.equal(gates.noise(5, 0), HardConcreteGates(3, 4, noise_seed=8).noise(5, 0))
    eps = gates.config.eps
    u = torch.stack([gates.noise(s, 0) for s in range(2000)])
    assert float(u.min()) >= eps and float(u.max()) <= 1 - eps and abs(float(u.mean()) - 0.5) < 0.01


def test_expected_gate_matches_monte_carlo():
    torch.manual_seed(3)
    gates = HardConcreteGates(2, 3, HardConcreteConfig(init_mean=0.0, init_std=2.0))
    mc = torch.stack([gates.sample() for _ in range(20000)]).mean(0).detach()
    assert torch.allclose(gates.expected_gate(), mc, atol=0.01), (gates.expected_gate(), mc)


def test_binarizing_undecided_gates_is_reported_as_a_warning():
    from megatron_ext.consa.callback import ConSACallback

    cfg = HybridAttentionConfig(enabled=True, mask_learning_steps=10, target=0.5, constraint="per_layer")
    callback = ConSACallback(cfg, num_layers=2, num_kv_heads=4, consumed_tokens=lambda step: 64 * step, seed=0)
    with torch.no_grad():  # ties: every gate near log_alpha 0
        callback.gates.log_alpha.copy_(torch.tensor([[0.01, -0.01, 0.02, 0.0], [0.0, 0.01, -0.02, 0.01]]))
    report = callback.diagnostics(callback.gates.binarize(0.5, "per_layer"))
    assert report["polarized_fraction"] == 0.0
    assert any("SWA units' gates are decided" in w for w in report["warnings"])
    assert any("constraint had not settled" in w for w in report["warnings"])
    with torch.no_grad():  # all lean to SWA while the target keeps half FA: ties, whatever |log_alpha|
        callback.gates.log_alpha.copy_(torch.tensor([[-3.5, -3.4, -3.6, -3.5], [-3.5, -3.49, -3.5, -3.45]]))
    report = callback.diagnostics(callback.gates.binarize(0.5, "per_layer"))
    assert report["polarized_fraction"] == 0.0 and report["polarized_full"] == 0.0 and report["polarized_swa"] == 0.0
    assert any("full attention units' gates are decided" in w for w in report["warnings"])
    assert any("SWA units' gates are decided" in w for w in report["warnings"])
    with torch.no_grad():  # decided and at the bounds: no warning
        callback.gates.log_alpha.copy_(torch.tensor([[4.6, -4.6, 4.6, -4.6], [-4.6, 4.6, -4.6, 4.6]]))
    report = callback.diagnostics(callback.gates.binarize(0.5, "per_layer"))
    assert report["polarized_fraction"] == 1.0 and report["warnings"] == [] and report["constraint_gap"] < 1e-3


def test_undecided_gates_warn_unless_the_measured_window_cost_says_the_choice_cannot_matter():
    from megatron_ext.consa.callback import ConSACallback

    cfg = HybridAttentionConfig(
        enabled=True, mask_learning_steps=10, target=0.5, constraint="per_layer", window_cost_tolerance=0.01
    )
    callback = ConSACallback(cfg, num_layers=2, num_kv_heads=4, consumed_tokens=lambda step: 64 * step, seed=0)
    low, fa = cfg.hard_concrete.log_alpha_min, 1.41  # the constraint met at rho = 0.5: no gap warning
    with torch.no_grad():  # layer 0 a tie at the constraint's level, layer 1 decided
        callback.gates.log_alpha.copy_(torch.tensor([[-1.6, -1.59, -1.61, -1.6], [low, fa, low, fa]]))
    allocation = callback.gates.binarize(0.5, "per_layer")

    def polarization_warnings(report):
        return [w for w in report["warnings"] if "gates are decided" in w]

    report = callback.diagnostics(allocation)  # nothing measured (untrained start): warn
    assert report["window_cost"] is None and not report["harmless_ties"]
    assert len(polarization_warnings(report)) == 2 and "trained start" in report["warnings"][0]
    callback.window_losses = {"full": 5.0, "swa": 5.004}  # far keys worth nothing: ties are harmless
    report = callback.diagnostics(allocation)
    assert report["polarized_fraction"] == 0.5 and report["harmless_ties"]
    assert report["window_cost"] == pytest.approx(0.004)
    assert polarization_warnings(report) == []
    callback.window_losses = {"full": 5.0, "swa": 5.3}  # far keys matter: the ties may cost
    report = callback.diagnostics(allocation)
    assert not report["harmless_ties"] and len(polarization_warnings(report)) == 2
    assert "+0.3000 validation loss" in report["warnings"][0]
    with torch.no_grad():  # decided: nothing to excuse, whatever the cost
        callback.gates.log_alpha.copy_(torch.tensor([[low, fa, low, fa], [low, fa, low, fa]]))
    callback.window_losses = {"full": 5.0, "swa": 5.0}
    report = callback.diagnostics(callback.gates.binarize(0.5, "per_layer"))
    assert report["warnings"] == [] and not report["harmless_ties"]
    with torch.no_grad():  # a harmless tie does not excuse an unsettled constraint
        callback.gates.log_alpha.copy_(torch.tensor([[0.01, -0.01, 0.02, 0.0], [0.0, 0.01, -0.02, 0.01]]))
    report = callback.diagnostics(callback.gates.binarize(0.5, "per_layer"))
    assert report["harmless_ties"] and [w for w in report["warnings"] if "constraint had not settled" in w]
    restored = ConSACallback(cfg, num_layers=2, num_kv_heads=4, consumed_tokens=lambda step: 64 * step, seed=0)
    restored.load_state_dict(callback.state_dict())  # checkpointed with the callback's state
    assert restored.window_cost == callback.window_cost == 0.0
    state = callback.state_dict()
    del state["window_losses"]  # a checkpoint from before the measurement existed: nothing measured
    restored.load_state_dict(state)
    assert restored.window_cost is None


def test_gates_at_the_constraints_equilibrium_count_as_decided():
    """At rho = 0.5 with the SWA gates at the lower clamp, the constraint met exactly pins the FA gates
    at log_alpha ~ 1.41, below any sign threshold of 2: decided is a margin between the sides."""
    from megatron_ext.consa.callback import ConSACallback

    cfg = HybridAttentionConfig(enabled=True, mask_learning_steps=10, target=0.5, constraint="per_layer")
    callback = ConSACallback(cfg, num_layers=2, num_kv_heads=4, consumed_tokens=lambda step: 64 * step, seed=0)
    low = cfg.hard_concrete.log_alpha_min
    hc = cfg.hard_concrete
    p_low = float(callback.gates.prob_nonzero(torch.tensor(low)))  # P(z != 0) of an SWA gate at the clamp
    fa = math.log((1 - p_low) / p_low) + hc.beta * math.log(-hc.gamma / hc.zeta)  # P(z != 0) = 1 - p_low
    with torch.no_grad():
        callback.gates.log_alpha.copy_(torch.tensor([[fa, low, fa, low], [low, fa, low, fa]]))
    rho_hat = callback.gates.expected_swa_fraction("per_layer")
    assert torch.allclose(rho_hat, torch.full((2,), 0.5), atol=1e-4) and 1.3 < fa < 1.5
    report = callback.diagnostics(callback.gates.binarize(0.5, "per_layer"))
    assert report["polarized_fraction"] == 1.0 and report["warnings"] == [], report
    with torch.no_grad():  # one layer decided, the other a tie at the same level: only the tie is undecided
        callback.gates.log_alpha.copy_(torch.tensor([[fa, low, fa, low], [0.3, 0.31, 0.29, 0.3]]))
    report = callback.diagnostics(callback.gates.binarize(0.5, "per_layer"))
    assert report["polarized_fraction"] == 0.5 and report["polarized_full"] == 0.5 and report["polarized_swa"] == 0.5
    global_cfg = HybridAttentionConfig(enabled=True, mask_learning_steps=10, target=0.75, constraint="global")
    callback = ConSACallback(global_cfg, num_layers=2, num_kv_heads=4, consumed_tokens=lambda step: 64 * step, seed=0)
    with torch.no_grad():  # global groups: the margin runs across layers
        callback.gates.log_alpha.copy_(torch.tensor([[0.5, -2.0, -4.6, -4.6], [-4.6, 0.4, -4.6, -1.0]]))
    # FA: 0.5 and 0.4; the highest SWA unit is -1.0: FA margins 1.5 and 1.4 (undecided), SWA margins
    # 0.4 - (-2.0) = 2.4 and 5.0 (decided), 0.4 - (-1.0) = 1.4 (undecided)
    assert callback.polarized_fraction(side=True) == 0.0
    assert callback.polarized_fraction(side=False) == pytest.approx(5 / 6)
