"""Lipschitz maths: L̃ by hand, Thm. 1's monotonicity (property-based), spectral product, Jacobians,
the certified bound's constants and L_par."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev, vmap

from prunerl.lipschitz import (certified_bound, gaussian_c, input_jacobians, jacobian_norms,
                               lipschitz_surrogate, parameter_sensitivity, path_sensitivity,
                               robustness_alpha, spectral_product, surrogate_norm)
from prunerl.models import mlp


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
