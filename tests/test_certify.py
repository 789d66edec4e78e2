"""Per-state certificates (issue 14, item 1): IBP and CROWN bounds on max over the ℓ∞ ball of
‖μ(ŝ) − μ(s)‖₂ are sound (no strong PGD attack, no sampled point gets past them, property-based
over random masked tanh / ReLU MLPs), ordered (CROWN ≤ IBP ≤ L̃_∞·ε ≤ L̃·√d·ε) and exact where the answer is
known; bad settings name the value and what is allowed."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunerl.certify import (certified_deviation, certified_tv, check_certificate_settings, crown_bounds,
                             deviation_bound, distribution, interval_bounds, relaxation)
from prunerl.lipschitz import gaussian_c, input_jacobians, lipschitz_surrogate

TOL = 1e-9  # float64 rounding; the bounds are computed in float64 and the attack runs in float64


def random_mlp(g: torch.Generator, widths, relu: bool, density: float, scale: float, bias: float) -> nn.Sequential:
    """A float64 MLP with random weights, a random mask (pruned entries exactly zero) and random biases."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(n_in, n_out).double()
        with torch.no_grad():
            w = torch.randn(n_out, n_in, generator=g, dtype=torch.double) * scale / math.sqrt(n_in)
            lin.weight.copy_(w * (torch.rand(n_out, n_in, generator=g) < density))
            lin.bias.copy_(torch.randn(n_out, generator=g, dtype=torch.double) * bias)
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.ReLU() if relu else nn.Tanh())
    return nn.Sequential(*layers)


def pgd_attack(net, s, eps, g, restarts=24, steps=40):
    """A strong ℓ∞ attack on ‖μ(ŝ) − μ(s)‖₂: random starts and corners, signed-gradient ascent
    with a decaying step, projected to the ball; every point it evaluates comes back too (B, N, d)."""
    b, d = s.shape
    mu = net(s).detach().unsqueeze(1)
    start = torch.rand(b, restarts, d, generator=g, dtype=torch.double) * 2 - 1
    start[:, : restarts // 2] = start[:, : restarts // 2].sign()  # half of them at corners
    x = s.unsqueeze(1) + eps * start
    seen = [x]
    for t in range(steps):
        x = x.detach().requires_grad_(True)
        dist = (net(x) - mu).pow(2).sum(-1).clamp_min(1e-30).sqrt()
        (grad,) = torch.autograd.grad(dist.sum(), x)
        step = eps * (0.25 if t < steps // 2 else 0.05)
        with torch.no_grad():
            x = s.unsqueeze(1) + (x + step * grad.sign() - s.unsqueeze(1)).clamp(-eps, eps)
        seen.append(x)
    pts = torch.cat(seen, 1)
    assert float((pts - s.unsqueeze(1)).abs().max()) <= eps + 1e-12  # inside the ball (up to rounding of s + δ)
    with torch.no_grad():
        delta = net(pts) - mu                                             # (B, N, out)
    return delta.norm(dim=-1).max(1).values, delta


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 8), hidden=st.lists(st.integers(1, 16), min_size=1, max_size=3),
       out=st.integers(1, 4), relu=st.booleans(), density=st.floats(0.2, 1.0), scale=st.floats(0.3, 3.0),
       bias=st.floats(0.0, 2.0), eps=st.one_of(st.just(0.0), st.floats(1e-4, 0.5)))
def test_bounds_are_never_beaten_by_an_attack_and_are_ordered(seed, d, hidden, out, relu, density, scale, bias, eps):
    g = torch.Generator().manual_seed(seed)
    net = random_mlp(g, [d, *hidden, out], relu, density, scale, bias)
    s = torch.randn(4, d, generator=g, dtype=torch.double) * 2
    found, delta = pgd_attack(net, s, eps, g)
    ibp = interval_bounds(net, s, eps)
    crown = crown_bounds(net, s, eps)
    plain = crown_bounds(net, s, eps, intersect=False)
    for lo, hi in (ibp, crown, plain):
        # every point the attack evaluated lies inside every coordinate's interval...
        assert bool((delta >= lo.unsqueeze(1) - TOL).all() and (delta <= hi.unsqueeze(1) + TOL).all())
        # ...so no attack beats the norm bound
        assert bool((found <= deviation_bound(lo, hi) * (1 + TOL) + TOL).all())
    d_ibp, d_crown = deviation_bound(*ibp), deviation_bound(*crown)
    # CROWN's intervals are intersected with IBP's: never looser, per state
    assert bool((d_crown <= d_ibp * (1 + TOL) + TOL).all())
    # and IBP never above the global figure for the ℓ∞ ball, L̃_∞·ε (the box stays inside |W_L|⋯|W_1|𝟙·ε)
    global_linf = lipschitz_surrogate(net, ball="linf") * eps
    assert bool((d_ibp <= global_linf * (1 + TOL) + TOL).all())
    # nor above the paper's global bound L̃·r with r = √d·ε, the ℓ2 radius of the ℓ∞ ball (issue 14's
    # L̃·√d·ε; L̃_∞ ≤ √d·L̃ since ‖|W₁|𝟙‖₂ ≤ √d·‖|W₁|‖₂)
    global_l2 = lipschitz_surrogate(net) * math.sqrt(d) * eps
    assert global_linf <= global_l2 * (1 + TOL) + TOL
    assert bool((d_ibp <= global_l2 * (1 + TOL) + TOL).all())
    # the functions the callback calls agree with the pieces
    assert torch.allclose(certified_deviation(net, s, eps, "crown", chunk=3), d_crown)
    assert torch.allclose(certified_deviation(net, s, eps, "ibp"), d_ibp)


def test_the_attack_is_strong_enough_for_the_soundness_test_to_mean_something():
    # a weak attack would pass the soundness test against any bound: on random small nets PGD must
    # reach most of CROWN's bound (here: median 0.89, 10th percentile 0.75; two random starts and
    # no gradient steps: 0.50 / 0.22 — its 12 corner starts carry much of the strength on these
    # nets. Over the property test's distribution: median 0.955)
    g = torch.Generator().manual_seed(0)
    ratios = []
    for i in range(40):
        d, relu = 2 + i % 6, bool(i % 2)
        net = random_mlp(g, [d, 12, 12, 3], relu, 0.7, 1.5, 0.5)
        s = torch.randn(4, d, generator=g, dtype=torch.double) * 2
        found, _ = pgd_attack(net, s, 0.1, g)
        ratios.append(found / deviation_bound(*crown_bounds(net, s, 0.1)))
    ratios = torch.cat(ratios)
    assert float(ratios.max()) <= 1 + 1e-9
    assert float(ratios.median()) >= 0.8 and float(torch.quantile(ratios, 0.1)) >= 0.5


@settings(max_examples=150, deadline=None)
@given(l=st.floats(-6, 6), w=st.floats(0, 8), relu=st.booleans())
def test_relaxation_lines_sandwich_the_activation(l, w, relu):
    lo, up = torch.tensor([l], dtype=torch.double), torch.tensor([l + w], dtype=torch.double)
    k_lo, b_lo, k_up, b_up = relaxation(relu, lo, up)
    z = torch.linspace(l, l + w, 2001, dtype=torch.double)
    f = torch.relu(z) if relu else torch.tanh(z)
    assert float((k_lo * z + b_lo - f).max()) <= 1e-12
    assert float((f - (k_up * z + b_up)).max()) <= 1e-12


def test_tanh_relaxation_is_crowns_tight_one():
    # soundness does not depend on the slopes (exact intercepts), tightness does: across 0 the upper
    # line is the tangent through (l, tanh l) and the lower one the tangent through (u, tanh u); on
    # the convex side (u ≤ 0) the upper line is the chord, on the concave side (l ≥ 0) the lower one
    l = torch.tensor([-2.0, -0.5, -3.0, 0.5], dtype=torch.double)
    u = torch.tensor([2.0, 0.5, -1.0, 3.0], dtype=torch.double)
    k_lo, b_lo, k_up, b_up = relaxation(False, l, u)
    cross = slice(0, 2)
    assert torch.allclose((k_up * l + b_up)[cross], torch.tanh(l)[cross], atol=1e-6)
    assert torch.allclose((k_lo * u + b_lo)[cross], torch.tanh(u)[cross], atol=1e-6)
    # ...and each is a tangent: it also touches tanh inside the interval, the upper line on (0, u],
    # the lower one on [l, 0) (any steeper slope with its exact intercept passes through the
    # endpoint too, so the endpoint alone does not pin CROWN's line)
    for i in range(2):
        z_pos = torch.linspace(0, float(u[i]), 20001, dtype=torch.double)
        z_neg = torch.linspace(float(l[i]), 0, 20001, dtype=torch.double)
        assert float((k_up[i] * z_pos + b_up[i] - torch.tanh(z_pos)).min()) <= 1e-6
        assert float((torch.tanh(z_neg) - (k_lo[i] * z_neg + b_lo[i])).min()) <= 1e-6
    for line_k, line_b, i in ((k_up, b_up, 2), (k_lo, b_lo, 3)):  # chords: through both endpoints
        assert float(line_k[i] * l[i] + line_b[i]) == pytest.approx(float(torch.tanh(l[i])), abs=1e-12)
        assert float(line_k[i] * u[i] + line_b[i]) == pytest.approx(float(torch.tanh(u[i])), abs=1e-12)


def test_a_linear_network_is_bounded_exactly():
    # μ(s) = W s + b: each coordinate moves by exactly ±ε‖W_j‖₁ (at the corner ε·sign(W_j)), so IBP
    # and CROWN give the same, exact intervals, and the norm bound is ε‖|W|𝟙‖₂ = L̃_∞·ε
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3)).double()
    with torch.no_grad():
        net[0].weight.mul_(torch.rand(3, 5, dtype=torch.double) < 0.6)  # a mask with zeros
    s, eps = torch.randn(7, 5, dtype=torch.double), 0.075
    w = net[0].weight.detach()
    exact = eps * w.abs().sum(1)
    for lo, hi in (interval_bounds(net, s, eps), crown_bounds(net, s, eps)):
        assert torch.allclose(hi, exact.expand(7, -1), rtol=1e-12) and torch.allclose(lo, -exact.expand(7, -1), rtol=1e-12)
    assert float(certified_deviation(net, s, eps)[0]) == pytest.approx(lipschitz_surrogate(net, ball="linf") * eps, rel=1e-12)
    # one output: the bound is attained at a corner of the ball
    row = nn.Sequential(nn.Linear(5, 1)).double()
    corner = s + eps * row[0].weight.detach().sign()
    moved = (row(corner) - row(s)).detach().abs().squeeze(-1)
    assert torch.allclose(certified_deviation(row, s, eps, "crown"), moved, rtol=1e-12)


def test_crown_is_exact_where_the_relus_are_all_on_and_ibp_is_not():
    # pre-activations ≥ 10 − 2ε > 0 over the ball: the net is μ(s) = W2·(W1 s + b1) = 2·s₁ + 20 there.
    # CROWN sees the linear map W2·W1 = [2, 0]: Δ = 2ε, attained at s + ε·(1, ±1). IBP bounds the
    # layers one by one, |W2|·|W1|·𝟙·ε = [1, 1]·[2, 2]ᵀ·ε = 4ε.
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[0].bias.fill_(10.0)
        net[2].weight.copy_(torch.tensor([[1.0, 1.0]]))
        net[2].bias.zero_()
    s, eps = torch.tensor([[0.3, -0.2], [1.0, 1.0]], dtype=torch.double), 0.1
    assert torch.allclose(certified_deviation(net, s, eps, "crown"), torch.full((2,), 2 * eps, dtype=torch.double))
    assert torch.allclose(certified_deviation(net, s, eps, "ibp"), torch.full((2,), 4 * eps, dtype=torch.double))
    moved = (net(s + torch.tensor([eps, eps])) - net(s)).detach().abs().squeeze(-1)
    assert torch.allclose(moved, torch.full((2,), 2 * eps, dtype=torch.double))
    # all units off (ReLU dead over the whole ball): nothing can move
    with torch.no_grad():
        net[0].bias.fill_(-10.0)
    assert float(certified_deviation(net, s, eps, "ibp").max()) == 0.0
    assert float(certified_deviation(net, s, eps, "crown").max()) == 0.0


def test_small_balls_give_the_first_order_figure_and_no_ball_gives_zero():
    # as ε → 0 CROWN's per-coordinate bound is ε‖J_j(s)‖₁ + O(ε²): Δ/ε → sqrt(Σ_j ‖J_j(s)‖₁²) = ‖|J(s)|𝟙‖₂
    torch.manual_seed(1)
    from prunerl.models import mlp
    for act in ("tanh", "relu"):
        net = mlp(6, 3, (24, 24), act, 1.0).double()
        s = torch.randn(16, 6, dtype=torch.double)
        eps = 1e-7
        first_order = input_jacobians(net, s).abs().sum(-1).pow(2).sum(-1).sqrt() * eps
        assert torch.allclose(certified_deviation(net, s, eps, "crown"), first_order, rtol=1e-4)
        for method in ("ibp", "crown"):  # zero up to float64 rounding (the box and μ(s) are summed differently)
            assert float(certified_deviation(net, s, 0.0, method).abs().max()) <= 1e-14


def test_tv_bound_and_distribution():
    dev = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4], dtype=torch.double)
    c = gaussian_c(torch.tensor([0.5, 0.25]))  # σ_min = 0.25
    assert torch.allclose(certified_tv(dev, c), dev / math.sqrt(2 * math.pi * 0.0625))
    stats = distribution(dev, threshold=0.2)
    assert stats["mean"] == pytest.approx(0.2) and stats["median"] == pytest.approx(0.2)
    assert stats["p95"] == pytest.approx(0.38)  # linear interpolation between 0.3 and 0.4
    assert stats["frac_below"] == pytest.approx(0.6)  # 0, 0.1, 0.2 are ≤ 0.2
    assert "frac_below" not in distribution(dev)


@pytest.mark.parametrize("methods, threshold, message", [
    (["ibp", "cron"], 0.1, "lipschitz.certificates=['ibp', 'cron']: 'cron' is not a certificate method; "
                           "allowed: ['ibp', 'crown']"),
    ("crown", 0.1, "lipschitz.certificates='crown' must be a list of methods from ['ibp', 'crown']"),
    (["ibp", "ibp"], 0.1, "names a method twice"),
    (["ibp"], 0.0, "lipschitz.certificate_threshold=0.0 is not allowed: a total-variation distance, so a number in (0, 1]"),
    (["ibp"], 1.5, "lipschitz.certificate_threshold=1.5 is not allowed"),
    (["ibp"], True, "lipschitz.certificate_threshold=True is not allowed"),
])
def test_bad_certificate_settings_name_the_value_and_what_is_allowed(methods, threshold, message):
    with pytest.raises(ValueError) as e:
        check_certificate_settings(methods, threshold, prefix="lipschitz.")
    assert message in str(e.value)
    assert check_certificate_settings([], 0.5) == ((), 0.5)


def test_bad_eps_method_or_states_are_refused():
    net = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"eps=-0.1 must be a finite number ≥ 0"):
        interval_bounds(net, torch.zeros(1, 3), -0.1)
    with pytest.raises(ValueError, match=r"method=\['lp'\]: 'lp' is not a certificate method"):
        certified_deviation(net, torch.zeros(1, 3), 0.1, "lp")
    with pytest.raises(ValueError, match=r"states of shape \(1, 4\): expected \(batch, 3\)"):
        crown_bounds(net, torch.zeros(1, 4), 0.1)
