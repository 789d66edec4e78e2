"""Lipschitz maths: L̃ by hand, Thm. 1's monotonicity (property-based), spectral product, Jacobians,
the certified bound's constants and L_par; the ℓ∞-ball figures (L̃_∞, ‖|J|𝟙‖₂) and the certified
bound of a real run stated for the attacks' ℓ∞ ball."""

import json
import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev, vmap

from prunerl.lipschitz import (certified_bound, gaussian_c, input_jacobians, jacobian_norms,
                               linf_to_l2_norm, lipschitz_surrogate, parameter_sensitivity,
                               path_sensitivity, robustness_alpha, spectral_product, surrogate_norm)
from prunerl.fit import fit
from prunerl.models import mlp
from prunerl.rundir import read_metrics


def _net(weights, act=nn.Tanh):
    layers = []
    for i, w in enumerate(weights):
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.zero_()
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(act())
    return nn.Sequential(*layers)


def test_surrogate_equals_a_hand_computation():
    w1 = torch.tensor([[3.0, 0.0], [4.0, 0.0]])  # ‖·‖_F = 5; ‖·‖_1 = 7, ‖·‖_∞ = 4: sqrt(28) = 5.29 → 5
    w2 = torch.tensor([[1.0, 1.0]])              # ‖·‖_F = sqrt 2; ‖·‖_1 = 1, ‖·‖_∞ = 2: sqrt 2
    w3 = torch.tensor([[1.0], [1.0], [1.0]])     # ‖·‖_F = sqrt 3; ‖·‖_1 = 3, ‖·‖_∞ = 1: sqrt 3
    assert float(surrogate_norm(w1)) == pytest.approx(5.0)
    net = _net([w1, w2, w3])
    assert lipschitz_surrogate(net) == pytest.approx(5.0 * math.sqrt(2) * math.sqrt(3))
    # a layer where sqrt(‖·‖_1 ‖·‖_∞) is the smaller one: 2·I has F = 2.83, sqrt(2·2) = 2
    assert float(surrogate_norm(2 * torch.eye(2))) == pytest.approx(2.0)
    # ReLU has L_σ = 1 too
    assert lipschitz_surrogate(_net([w1, w2, w3], nn.ReLU)) == pytest.approx(5.0 * math.sqrt(6))


def test_spectral_product_is_exact_tighter_and_not_monotone_under_pruning():
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # a with one entry zeroed
    eye = torch.eye(2)
    sa, sb = spectral_product(_net([a, eye])), spectral_product(_net([b, eye]))
    assert sa == pytest.approx(math.sqrt(2)) and sb == pytest.approx((1 + math.sqrt(5)) / 2)
    assert sb > sa  # REFERENCE.md: pruning can raise the spectral norm...
    assert lipschitz_surrogate(_net([b, eye])) <= lipschitz_surrogate(_net([a, eye]))  # ...not L̃
    torch.manual_seed(0)
    net = mlp(7, 3, (32, 32), "tanh", 1.0)
    exact = math.prod(float(torch.linalg.matrix_norm(m.weight.detach().double(), 2)) for m in net if isinstance(m, nn.Linear))
    assert spectral_product(net) == pytest.approx(exact, rel=1e-5)  # float32 eigensolver
    assert spectral_product(net) <= lipschitz_surrogate(net)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), widths=st.lists(st.integers(1, 24), min_size=2, max_size=5),
       relu=st.booleans(), rounds=st.integers(1, 4))
def test_surrogate_never_increases_under_random_masks(seed, widths, relu, rounds):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(o, i, generator=g) * float(torch.rand(1, generator=g) * 3)
          for i, o in zip(widths[:-1], widths[1:])]
    net = _net(ws, nn.ReLU if relu else nn.Tanh)
    before = lipschitz_surrogate(net)
    for _ in range(rounds):  # successive random masks, each keeping a random fraction
        keep = float(torch.rand(1, generator=g))
        ws = [w * (torch.rand(w.shape, generator=g) < keep) for w in ws]
        after = lipschitz_surrogate(net, ws)
        assert after <= before  # Thm. 1 — exactly, not up to a tolerance
        before = after


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), widths=st.lists(st.integers(1, 24), min_size=2, max_size=5),
       rounds=st.integers(1, 4))
def test_linf_surrogate_never_increases_under_random_masks(seed, widths, rounds):
    # Thm. 1's "pruning cannot loosen the certified bound" holds for the ℓ∞ ball's L̃_∞ too
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(o, i, generator=g) * float(torch.rand(1, generator=g) * 3)
          for i, o in zip(widths[:-1], widths[1:])]
    net = _net(ws)
    before = lipschitz_surrogate(net, ball="linf")
    for _ in range(rounds):
        keep = float(torch.rand(1, generator=g))
        ws = [w * (torch.rand(w.shape, generator=g) < keep) for w in ws]
        after = lipschitz_surrogate(net, ws, ball="linf")
        assert after <= before  # exactly
        before = after


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 12), cols=st.integers(1, 40),
       density=st.floats(0.05, 1.0))
def test_linf_to_l2_norm_lies_between_the_frobenius_norm_and_sqrt_n_times_the_surrogate_norm(seed, rows, cols, density):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.double) * (torch.rand(rows, cols, generator=g) < density)
    by_hand = math.sqrt(sum(sum(abs(float(x)) for x in row) ** 2 for row in w))  # ‖ |W|·𝟙 ‖₂
    assert float(linf_to_l2_norm(w)) == pytest.approx(by_hand, rel=1e-12)
    fro = float(torch.linalg.vector_norm(w))
    one, inf = float(w.abs().sum(0).max()), float(w.abs().sum(1).max())
    assert float(surrogate_norm(w)) <= fro * (1 + 1e-12) <= float(linf_to_l2_norm(w)) * (1 + 2e-12)
    assert float(linf_to_l2_norm(w)) <= math.sqrt(cols) * min(fro, math.sqrt(one * inf)) * (1 + 1e-12)
    # an upper bound on the ℓ∞→ℓ2 operator norm: no sign vector (the ℓ∞ ball's corners) beats it
    signs = torch.where(torch.rand(64, cols, generator=g) < 0.5, -1.0, 1.0).double()
    assert float(torch.linalg.vector_norm(signs @ w.T, dim=1).max()) <= float(linf_to_l2_norm(w)) * (1 + 1e-12)
    # monotone in |W_ij|: zero one entry
    if w.numel() > 1:
        v = w.clone()
        v.view(-1)[int(torch.randint(w.numel(), (1,), generator=g))] = 0
        assert float(linf_to_l2_norm(v)) <= float(linf_to_l2_norm(w))


def test_linf_ball_figures_bound_what_the_l2_figure_understates():
    # f(s) = Σ_j s_j on d = 11 inputs: on the ℓ∞ ball of radius ε the corner ε·𝟙 moves f by d·ε,
    # √d times App. B's L̃·ε (L̃ = ‖𝟙ᵀ‖_F = √d); L̃_∞ = ‖|W|𝟙‖₂ = d is exact here
    d, eps = 11, 0.075
    net = _net([torch.ones(1, d)])
    s = torch.zeros(1, d)
    moved = float((net(s + eps) - net(s)).detach().norm())
    assert moved == pytest.approx(d * eps)
    assert moved > lipschitz_surrogate(net) * eps * 3  # the ℓ2-ball figure is broken by √11 ≈ 3.3
    assert lipschitz_surrogate(net, ball="linf") == pytest.approx(d)
    # random tanh / ReLU networks: no corner of the ℓ∞ ball, nor a signed-gradient ascent, gets
    # past L̃_∞·ε; L̃ ≤ L̃_∞ ≤ √d·L̃
    torch.manual_seed(3)
    for act in ("tanh", "relu"):
        net = mlp(d, 3, (32, 32), act, 1.0).double()
        lt, li = lipschitz_surrogate(net), lipschitz_surrogate(net, ball="linf")
        assert lt < li <= math.sqrt(d) * lt
        s = torch.randn(256, d, dtype=torch.double)
        corners = s + eps * torch.where(torch.rand(256, d) < 0.5, -1.0, 1.0).double()
        assert float((net(corners) - net(s)).detach().norm(dim=1).max()) <= li * eps
        x = corners.clone().requires_grad_(True)
        for _ in range(10):  # ℓ∞ PGD on ‖f(x) − f(s)‖₂ from the corners
            (grad,) = torch.autograd.grad((net(x) - net(s)).norm(dim=1).sum(), x)
            with torch.no_grad():
                x = (s + (x + eps / 4 * grad.sign() - s).clamp(-eps, eps)).requires_grad_(True)
        assert float((net(x) - net(s)).detach().norm(dim=1).max()) <= li * eps


def test_linf_jacobian_norm_matches_autograd_and_never_exceeds_the_global_linf_figure():
    torch.manual_seed(4)
    for act in ("tanh", "relu"):
        net = mlp(6, 2, (16, 16), act, 1.0).double()
        s = torch.randn(50, 6, dtype=torch.double)
        j = vmap(jacrev(net))(s)
        by_hand = j.abs().sum(-1).pow(2).sum(-1).sqrt()  # ‖ |J(s)|·𝟙 ‖₂
        assert torch.allclose(jacobian_norms(net, s, ball="linf"), by_hand, rtol=1e-12)
        # |J| ≤ |W_L|⋯|W_1| entrywise, so ‖|J(s)|𝟙‖₂ ≤ L̃_∞ at every state
        assert float(jacobian_norms(net, s, ball="linf").max()) <= lipschitz_surrogate(net, ball="linf")
    # one output: ‖|J|𝟙‖₂ = ‖J‖_1 is attained on the ℓ∞ ball at δ = sign(J)
    net = mlp(6, 1, (16,), "tanh", 1.0).double()
    s = torch.randn(1, 6, dtype=torch.double)
    j = vmap(jacrev(net))(s)[0, 0].detach()
    assert float(jacobian_norms(net, s, ball="linf")[0]) == pytest.approx(float(j @ j.sign()))


def test_bad_ball_names_the_value_and_what_is_allowed():
    net = mlp(3, 1, (4,), "tanh", 1.0)
    with pytest.raises(ValueError, match=r"ball='l1' is not allowed; allowed: \['linf', 'l2'\]"):
        lipschitz_surrogate(net, ball="l1")
    with pytest.raises(ValueError, match="ball='L2' is not allowed"):
        jacobian_norms(net, torch.zeros(1, 3), ball="L2")


def test_jacobians_and_parameter_sensitivity_match_autograd():
    torch.manual_seed(1)
    for act in ("tanh", "relu"):
        net = mlp(5, 3, (16, 16), act, 0.5).double()
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.bias, std=0.3)
        s = torch.randn(20, 5, dtype=torch.double)
        ref = vmap(jacrev(net))(s)
        assert torch.allclose(input_jacobians(net, s), ref, atol=1e-12)
        assert torch.allclose(jacobian_norms(net, s), torch.linalg.matrix_norm(ref, 2), atol=1e-10)
        params = dict(net.named_parameters())
        jp = vmap(jacrev(lambda p, x: functional_call(net, p, (x,))), in_dims=(None, 0))(params, s)
        full = torch.cat([jp[k].reshape(20, 3, -1) for k in params], -1)  # J_φ over all parameters
        expected = float(torch.linalg.matrix_norm(full, 2).pow(2).mean().sqrt())
        assert parameter_sensitivity(net, s) == pytest.approx(expected, rel=1e-9)


def test_path_sensitivity_is_the_path_integral():
    torch.manual_seed(2)
    net = mlp(4, 2, (8, 8), "tanh", 1.0).double()
    s = torch.randn(16, 4, dtype=torch.double)
    theta = [m.weight.detach().clone() for m in net if isinstance(m, nn.Linear)]
    pruned = [w * (w.abs() > 0.4) for w in theta]
    # a fine trapezoid rule agrees with 8-node Gauss–Legendre
    ts = torch.linspace(0, 1, 401, dtype=torch.double)
    vals = [parameter_sensitivity(net, s, [p + float(t) * (q - p) for q, p in zip(theta, pruned)]) for t in ts]
    trap = float(torch.trapezoid(torch.tensor(vals), ts))
    assert path_sensitivity(net, s, theta, pruned, points=8) == pytest.approx(trap, rel=1e-5)
    # no pruning: the path is one point
    assert path_sensitivity(net, s, theta, theta, points=3) == pytest.approx(parameter_sensitivity(net, s))


def test_certified_bound_constants():
    assert robustness_alpha(0.99, 10.0) == pytest.approx(2 * (1 + 0.99 / 0.01 ** 2) * 10)
    assert gaussian_c(torch.tensor([0.1, 0.2])) == pytest.approx(1 / math.sqrt(2 * math.pi * 0.01))
    assert certified_bound(2.0, 0.075, 0.99, 10.0, 0.1) == pytest.approx(
        robustness_alpha(0.99, 10.0) * gaussian_c(0.1) * 2.0 * 0.075)


@pytest.mark.parametrize("env, d", [("inverted_pendulum", 4), ("hopper", 11)])
def test_a_real_runs_certified_bound_is_for_the_attacks_linf_ball(small_cfg, tmp_path, env, d):
    summary = fit(small_cfg(f"env={env}", "algo.kappa=0", "callbacks.lipschitz.every_n_updates=16",
                            "++callbacks.evaluation=null"))
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    eps, gamma, r_max = cfg["env"]["eps"], cfg["algo"]["gamma"], cfg["env"]["r_max"]
    assert on_disk["certified_bound_ball"] == "linf" and on_disk["certified_bound_eps"] == eps
    assert on_disk["obs_dim"] == d
    # the figures by hand from the final weights: α·c·L̃·ε (ℓ2 ball) and α·c·L̃_∞·ε (ℓ∞ ball)
    sd = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    ws = [sd[f"actor.mean_net.{i}.weight"].double() for i in (0, 2, 4)]
    assert ws[0].shape[1] == d
    norms = [min(float(w.norm()), math.sqrt(float(w.abs().sum(0).max() * w.abs().sum(1).max()))) for w in ws]
    first_linf = float(ws[0].abs().sum(1).norm())  # ‖ |W₁|·𝟙 ‖₂
    alpha = 2 * (1 + gamma / (1 - gamma) ** 2) * r_max
    c = 1 / math.sqrt(2 * math.pi * float(sd["actor.log_std"].double().exp().pow(2).min()))
    l2ball = alpha * c * math.prod(norms) * eps
    assert on_disk["certified_bound_l2ball"] == pytest.approx(l2ball, rel=1e-5)
    assert on_disk["certified_bound"] == pytest.approx(alpha * c * first_linf * norms[1] * norms[2] * eps, rel=1e-5)
    assert l2ball < on_disk["certified_bound"] <= math.sqrt(d) * l2ball  # in (α·c·L̃·ε, √d·α·c·L̃·ε]
    # Thm. 3's robustness-gap term is stated for the same ball, with the pruned weights' L̃_∞
    lip = on_disk["lipschitz"]
    last = lip["last_mask_update"]
    assert lip["mask_updates"] == 2 and lip["ball"] == "linf"
    assert last["c"] > 0 and (last["c"] != c) == (cfg["algo"]["model"]["learn_std"] is True)  # σ moved (learned) or not
    assert last["thm3_robustness_gap"] == pytest.approx(alpha * last["c"] * last["surrogate_linf_actor_after"] * eps,
                                                        rel=1e-6)
    assert last["surrogate_actor_after"] < last["surrogate_linf_actor_after"] <= math.sqrt(d) * last["surrogate_actor_after"]
    # the local figure is an estimate for the ℓ∞ ball, never above the certified bound
    rows = [r for r in read_metrics(run) if "lipschitz/local_estimate" in r]
    assert rows and "lipschitz/local_bound" not in {k for r in read_metrics(run) for k in r}
    for r in rows:
        assert 0 < r["lipschitz/local_estimate"] <= r["lipschitz/certified_bound"]
        assert r["lipschitz/c"] == pytest.approx(1 / math.sqrt(2 * math.pi * r["lipschitz/sigma_min"] ** 2), rel=1e-6)
        assert r["lipschitz/local_estimate"] == pytest.approx(alpha * r["lipschitz/c"] * r["lipschitz/jacobian_linf_max"] * eps,
                                                              rel=1e-6)
        assert r["lipschitz/jacobian_linf_max"] > r["lipschitz/jacobian_max"]  # ‖|J|𝟙‖₂ ≥ ‖J‖_F ≥ ‖J‖_op
        assert r["lipschitz/certified_bound"] == pytest.approx(
            alpha * r["lipschitz/c"] * r["lipschitz/surrogate_linf_actor"] * eps, rel=1e-6)
        # issue 14: per-state certificates beside L̃ — CROWN ≤ IBP ≤ the global L̃_∞·ε, TV = c·Δ
        assert r["lipschitz/cert_global_dmu"] == pytest.approx(r["lipschitz/surrogate_linf_actor"] * eps, rel=1e-9)
        for stat in ("mean", "median", "p95"):
            crown, ibp = r[f"lipschitz/cert_crown_dmu_{stat}"], r[f"lipschitz/cert_ibp_dmu_{stat}"]
            assert 0 < crown <= ibp * (1 + 1e-9) and ibp <= r["lipschitz/cert_global_dmu"] * (1 + 1e-9)
            assert r[f"lipschitz/cert_crown_tv_{stat}"] == pytest.approx(r["lipschitz/c"] * crown, rel=1e-9)
        assert 0 <= r["lipschitz/cert_ibp_certified_frac"] <= r["lipschitz/cert_crown_certified_frac"] <= 1
    # ...and the last of them in summary.json, from the final weights
    cert = on_disk["certificates"]
    assert cert["ball"] == "linf" and cert["eps"] == eps and cert["threshold"] == 0.1 and cert["states"] > 0
    assert cert["c"] == pytest.approx(c, rel=1e-6)
    assert cert["global"]["dmu"] == pytest.approx(on_disk["lipschitz_surrogate_linf"] * eps, rel=1e-9)
    assert cert["crown"]["dmu"]["median"] <= cert["ibp"]["dmu"]["median"] <= cert["global"]["dmu"]
    assert cert["crown"]["tv"]["median"] == pytest.approx(c * cert["crown"]["dmu"]["median"], rel=1e-6)
