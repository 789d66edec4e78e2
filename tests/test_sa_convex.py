"""``algo.sa.method=convex`` (issue 14, item 2): the SA regulariser as a certified upper bound of
max_{ŝ∈B∞(s,ε)} KL(π(·|s) ‖ π(·|ŝ)) by convex relaxation (β·CROWN-IBP + (1 − β)·IBP).

The bound is never below what the SGLD maximiser, a PGD attack or random points of the ball find
(property-based over random masked tanh / ReLU MLPs), is 0 without a ball, is differentiable
w.r.t. every weight of the mean network (its gradient checked against finite differences), the
update adds κ times that gradient, β follows its schedule, a short real fit trains with it and logs
it, and sgld stays the default."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunerl.certify import (_tanh_upper_slope, crown_ibp_bounds, deviation_bound, interval_bounds,
                             mixed_output_bounds, relaxation)
from prunerl.fit import fit
from prunerl.models import Critic, GaussianActor
from prunerl.module import PPOModule
from prunerl.rundir import read_metrics
from prunerl.sa import gaussian_kl, kl_upper_bound, max_kl_perturbation
from tests.test_certify import pgd_attack, random_mlp

TOL = 1e-9  # float64 rounding


def strongest_kl(net, s, std, eps, g):
    """The largest KL(π(·|s) ‖ π(·|ŝ)) per state that the project's SGLD maximiser (three random
    starts, 60 steps each, two step sizes), a PGD attack on ‖Δμ‖₂ (all its points) and 256 uniform
    random points of the ball find."""
    best = torch.zeros(s.shape[0], dtype=s.dtype)
    for ratio in (0.1, 0.1, 0.025):
        _, kl = max_kl_perturbation(net, s, std, eps, steps=60, step_size=eps * ratio, noise=0.0, generator=g)
        best = torch.maximum(best, kl)
    mu = net(s).detach()
    _, delta = pgd_attack(net, s, eps, g, restarts=8, steps=20)            # (B, N, out)
    best = torch.maximum(best, gaussian_kl(torch.zeros_like(delta), delta, std).max(1).values)
    pts = s.unsqueeze(1) + eps * (torch.rand(s.shape[0], 256, s.shape[1], generator=g, dtype=s.dtype) * 2 - 1)
    with torch.no_grad():
        kl_rand = gaussian_kl(mu.unsqueeze(1), net(pts), std).max(1).values
    return torch.maximum(best, kl_rand)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 8), hidden=st.lists(st.integers(1, 16), min_size=1, max_size=3),
       out=st.integers(1, 4), relu=st.booleans(), density=st.floats(0.2, 1.0), scale=st.floats(0.3, 3.0),
       bias=st.floats(0.0, 2.0), eps=st.floats(1e-3, 0.5), beta=st.floats(0.0, 1.0))
def test_the_kl_bound_is_never_below_what_sgld_pgd_or_random_points_find(seed, d, hidden, out, relu, density,
                                                                          scale, bias, eps, beta):
    g = torch.Generator().manual_seed(seed)
    net = random_mlp(g, [d, *hidden, out], relu, density, scale, bias)
    s = torch.randn(4, d, generator=g, dtype=torch.double) * 2
    std = torch.rand(out, generator=g, dtype=torch.double) + 0.2
    found = strongest_kl(net, s, std, eps, g)
    bounds = {b: kl_upper_bound(net, s, std, eps, b).detach() for b in (0.0, beta, 1.0)}
    for b, bound in bounds.items():
        assert bool((found <= bound * (1 + TOL) + TOL).all()), (b, found, bound)
    # what is true of the mix (not "IBP ≥ CROWN-IBP", which can fail): each coordinate's deviation
    # bound is at most the β-mix of the two, and x² is convex, so KL(β) ≤ β·KL(1) + (1 − β)·KL(0)
    mix = beta * bounds[1.0] + (1 - beta) * bounds[0.0]
    assert bool((bounds[beta] <= mix * (1 + TOL) + TOL).all())
    # the float64 diagnostics function (bisection tangents) is sound too, and β = 1 agrees with it
    lo, hi = crown_ibp_bounds(net, s, eps)
    assert bool((found <= 0.5 * (torch.maximum(lo.abs(), hi.abs()) / std).pow(2).sum(-1) * (1 + TOL) + TOL).all())


def test_the_soundness_test_has_teeth():
    """The maximisers reach a good part of the bound on these nets (so a bound that dropped the ε
    term or the σ scaling would be caught), and IBP is the looser of the two on deep nets."""
    g = torch.Generator().manual_seed(1)
    ratios = []
    for i in range(12):
        net = random_mlp(g, [4, 12, 12, 3], bool(i % 2), 0.8, 1.5, 0.5)
        s = torch.randn(4, 4, generator=g, dtype=torch.double)
        std = torch.rand(3, generator=g, dtype=torch.double) + 0.5
        ratios.append(strongest_kl(net, s, std, 0.05, g) / kl_upper_bound(net, s, std, 0.05, 1.0).detach())
    ratios = torch.cat(ratios)
    assert float(ratios.max()) <= 1 + 1e-9 and float(ratios.median()) >= 0.3


def test_no_ball_gives_zero_and_small_balls_a_quadratically_small_bound():
    torch.manual_seed(0)
    actor = GaussianActor(5, 2, (32, 32), "tanh", 0.5, learn_std=True)
    s = torch.randn(16, 5)
    a64 = copy.deepcopy(actor).double()
    for beta in (0.0, 0.5, 1.0):
        assert torch.equal(kl_upper_bound(actor, s, actor.std, 0.0, beta), torch.zeros(16))
        big, small = (kl_upper_bound(a64, s.double(), a64.std, e, beta) for e in (1e-2, 1e-5))
        assert bool((small > 0).all()) and float((small / big).detach().max()) < 1e-5   # ~(1e-5 / 1e-2)² = 1e-6


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_bound_is_differentiable_in_every_weight_and_its_gradient_is_right(activation, beta):
    torch.manual_seed(0)
    actor = GaussianActor(11, 3, (64, 64), activation, 1.0, learn_std=True)
    with torch.no_grad():  # a pruned layer: zeroed entries stay in the graph (the pruning callback masks their gradient)
        actor.mean_net[2].weight.mul_(torch.rand_like(actor.mean_net[2].weight) > 0.5)
    s = torch.randn(128, 11)
    kl_upper_bound(actor, s, actor.std, 0.1, beta).mean().backward()
    for name, p in actor.mean_net.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name
    assert actor.log_std.grad is None   # σ is detached, as in SGLD
    # the gradient is the bound's (slopes included): central differences in float64 along a random
    # direction of each parameter, μ(s) held fixed (it is detached: the regulariser's gradient
    # treats it as a constant, as SGLD's does)
    a64, s64 = copy.deepcopy(actor).double(), s.double()
    mu = a64(s64).detach()
    params = list(a64.mean_net.parameters())
    grads = torch.autograd.grad(kl_upper_bound(a64, s64, a64.std, 0.1, beta, mean=mu).mean(), params)
    g = torch.Generator().manual_seed(1)
    for p, grad in zip(params, grads):
        d, h = torch.randn(p.shape, generator=g, dtype=p.dtype), 1e-8  # small: ReLU and the relaxations have kinks
        with torch.no_grad():
            p.add_(h * d)
            up = float(kl_upper_bound(a64, s64, a64.std, 0.1, beta, mean=mu).mean())
            p.sub_(2 * h * d)
            down = float(kl_upper_bound(a64, s64, a64.std, 0.1, beta, mean=mu).mean())
            p.add_(h * d)
        assert math.isclose((up - down) / (2 * h), float((grad * d).sum()), rel_tol=1e-3)


def test_float32_training_bound_is_the_float64_one_to_rounding():
    torch.manual_seed(0)
    actor = GaussianActor(11, 3, (256, 256), "tanh", 1.0, learn_std=True)
    with torch.no_grad():
        actor.mean_net[4].weight.mul_(30)   # a trained policy's output scale, so the bound is not tiny
    s = torch.randn(64, 11)
    a64 = copy.deepcopy(actor).double()
    for beta in (0.0, 0.5, 1.0):
        b32 = kl_upper_bound(actor, s, actor.std, 0.075, beta).detach()
        b64 = kl_upper_bound(a64, s.double(), a64.std, 0.075, beta).detach()
        assert b32.dtype == torch.float32
        assert torch.allclose(b32.double(), b64, rtol=1e-4, atol=1e-9)


def test_the_tabulated_tangents_are_the_bisections_and_sandwich_tanh():
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(20000, generator=g, dtype=torch.double) * -12
    up = lo + torch.rand(20000, generator=g, dtype=torch.double) * 14
    for l, u in ((lo, up), (-up, -lo)):
        exact, table = _tanh_upper_slope(l, u), _tanh_upper_slope(l, u, tabulated=True)
        inside = l > -8  # beyond the table the tangent at t*(−8) is used: looser, still sound
        assert float((exact - table)[inside].abs().max()) < 1e-5
    k_lo, b_lo, k_up, b_up = relaxation(False, lo, up, tabulated=True)
    z = lo.unsqueeze(1) + (up - lo).unsqueeze(1) * torch.linspace(0, 1, 101, dtype=torch.double)
    tz = torch.tanh(z)
    assert bool((k_lo.unsqueeze(1) * z + b_lo.unsqueeze(1) <= tz + 1e-12).all())
    assert bool((k_up.unsqueeze(1) * z + b_up.unsqueeze(1) >= tz - 1e-12).all())


def test_mixed_bounds_are_the_certificate_bounds_at_the_ends():
    g = torch.Generator().manual_seed(3)
    net = random_mlp(g, [6, 16, 16, 3], False, 0.7, 1.5, 0.5)
    s = torch.randn(8, 6, generator=g, dtype=torch.double)
    mu = net(s).detach()
    lo, hi = mixed_output_bounds(net, s, 0.05, 0.0)
    il, iu = interval_bounds(net, s, 0.05)
    assert torch.allclose(lo - mu, il, atol=1e-12) and torch.allclose(hi - mu, iu, atol=1e-12)
    lo, hi = mixed_output_bounds(net, s, 0.05, 1.0)
    cl, cu = crown_ibp_bounds(net, s, 0.05)
    assert torch.allclose(deviation_bound(lo - mu, hi - mu), deviation_bound(cl, cu), rtol=1e-5)
    with pytest.raises(ValueError, match=r"beta=1.5 must lie in \[0, 1\]"):
        mixed_output_bounds(net, s, 0.05, 1.5)


def _module(**kw):
    torch.manual_seed(0)
    return PPOModule(GaussianActor(4, 2, (8, 8)), Critic(4, (8, 8)), total_updates=100, kappa=0.3, eps=0.1,
                     sa_method="convex", **kw)


def test_the_update_adds_kappa_times_the_gradient_of_the_bound():
    """PPOModule.training_step's actor gradient at κ = 0.3 is the κ = 0 one plus 0.3·∇R (R the convex
    bound at the update's ε and β): the regulariser reaches the update, not detached, not rescaled."""
    from tensordict import TensorDict
    from prunerl.sa import sa_regularizer_convex

    g = torch.Generator().manual_seed(3)
    batch = TensorDict({"observation": torch.randn(16, 4, generator=g), "action": torch.randn(16, 2, generator=g),
                        "sample_log_prob": torch.randn(16, generator=g), "advantage": torch.randn(16, generator=g),
                        "value_target": torch.randn(16, generator=g)}, batch_size=[16])
    grads = {}
    for kappa in (0.0, 0.3):
        torch.manual_seed(0)
        m = PPOModule(GaussianActor(4, 2, (8, 8)), Critic(4, (8, 8)), total_updates=100, kappa=kappa, eps=0.1,
                      eps_ramp=0.0, max_grad_norm=1e9, sa_method="convex", beta_start=0.5, beta_end=0.5)
        m.configure_optimizers()

        class _NoStep:
            step = staticmethod(lambda: None)
        m.optimizers = lambda: _NoStep
        m.manual_backward = lambda loss: loss.backward()
        m.training_step(batch, 0)
        grads[kappa] = [p.grad.clone() for p in m.actor.mean_net.parameters()]
    torch.manual_seed(0)
    actor = GaussianActor(4, 2, (8, 8))
    obs = batch["observation"]
    sa_regularizer_convex(actor, obs, actor.std, 0.1, 0.5, mean=actor(obs)).backward()
    for g0, g3, p in zip(grads[0.0], grads[0.3], actor.mean_net.parameters()):
        assert p.grad.abs().max() > 0
        assert torch.allclose(g3 - g0, 0.3 * p.grad, rtol=1e-4, atol=1e-6)


def test_beta_moves_from_start_to_end_over_its_ramp():
    m = _module(beta_start=1.0, beta_end=0.0, beta_ramp=0.5)
    assert [m.sa_beta(t) for t in (0, 25, 50, 75, 100)] == [1.0, 0.5, 0.0, 0.0, 0.0]
    m = _module(beta_start=0.0, beta_end=1.0, beta_ramp=1.0)   # the "IBP early" order
    assert [m.sa_beta(t) for t in (0, 50, 100)] == [0.0, 0.5, 1.0]
    m = _module(beta_start=0.2, beta_end=0.7, beta_ramp=0.0)
    assert m.sa_beta(0) == 0.7
    assert math.isclose(_module(beta_start=0.2, beta_end=0.7, beta_ramp=0.4).sa_beta(20), 0.45)


def test_the_module_refuses_what_it_cannot_bound():
    with pytest.raises(ValueError, match=r"algo.sa.method='pgd' is not allowed; allowed: \['sgld', 'convex'\]"):
        PPOModule(GaussianActor(4, 2, (8,)), Critic(4, (8,)), total_updates=10, sa_method="pgd")
    actor = GaussianActor(4, 2, (8,))
    actor.mean_net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="needs the actor's mean network to be a plain MLP"):
        PPOModule(actor, Critic(4, (8,)), total_updates=10, sa_method="convex")
    with pytest.raises(ValueError, match=r"algo.sa.beta_ramp=1.5 is outside \[0, 1\]"):
        _module(beta_ramp=1.5)
    with pytest.raises(ValueError, match="bounds a plain MLP"):
        kl_upper_bound(lambda x: x, torch.zeros(2, 3), torch.ones(3), 0.1, 0.5)


def test_sgld_stays_the_default(small_cfg):
    cfg = small_cfg()
    assert cfg.algo.sa.method == "sgld"
    assert PPOModule(GaussianActor(4, 2, (8,)), Critic(4, (8,)), total_updates=10).sa_method == "sgld"


def test_a_short_convex_fit_trains_and_logs_the_bound(small_cfg, tmp_path):
    summary = fit(small_cfg("algo.sa.method=convex", "algo.kappa=0.3", "total_frames=4096", "algo.sa.beta_ramp=0.5"))
    run = tmp_path / "run"
    assert (run / "summary.json").is_file() and summary["status"] == "finished" and summary["frames"] == 4096
    rows = [r for r in read_metrics(run) if "train/frames" in r]
    assert len(rows) == 4
    for r in rows:
        assert {"sa/kl_bound", "sa/loss_sa", "sa/sa_beta", "sa/sa_eps"} <= set(r) and "sa/sa_kl" not in r
        assert math.isfinite(r["sa/kl_bound"]) and r["sa/kl_bound"] >= 0
    # 64 updates, β ramps 1 → 0 over the first 32: the per-rollout means fall, then stay at 0
    betas = [r["sa/sa_beta"] for r in rows]
    assert betas[0] > betas[1] > betas[2] == betas[3] == 0.0
    assert rows[-1]["sa/kl_bound"] > 0     # ε has ramped up: a ball, so a positive bound
