"""The SA inner maximisation stays in the ε-ball and does not end below where it started."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunerl.models import GaussianActor
from prunerl.sa import gaussian_kl, max_kl_perturbation, sa_regularizer


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.001, 0.5), steps=st.integers(0, 12),
       activation=st.sampled_from(["tanh", "relu"]))
def test_inner_loop_stays_in_ball_and_kl_does_not_drop(seed, eps, steps, activation):
    torch.manual_seed(seed)
    actor = GaussianActor(11, 3, (32, 32), activation, sigma=0.1)
    for p in actor.parameters():  # a non-trivial function of the input
        torch.nn.init.normal_(p, std=0.5)
    obs = torch.randn(64, 11) * 3
    gen = torch.Generator().manual_seed(seed)
    s_hat, kl = max_kl_perturbation(actor, obs, actor.std, eps, steps=steps, generator=gen)
    assert (s_hat - obs).abs().max() <= eps + 1e-6
    # the KL at the random start, reproduced with the same generator
    gen0 = torch.Generator().manual_seed(seed)
    start = (obs + eps / 10 * torch.randn(obs.shape, generator=gen0).sign()).clamp(obs - eps, obs + eps)
    with torch.no_grad():
        kl_start = gaussian_kl(actor(obs), actor(start), actor.std)
        kl_end = gaussian_kl(actor(obs), actor(s_hat), actor.std)
    assert torch.allclose(kl, kl_end, atol=1e-5)
    assert (kl_end >= kl_start - 1e-6).all()


def test_inner_loop_increases_kl_on_average():
    torch.manual_seed(0)
    actor = GaussianActor(11, 3, (64, 64), "tanh", sigma=0.1)
    for p in actor.parameters():
        torch.nn.init.normal_(p, std=0.3)
    obs = torch.randn(256, 11)
    _, kl0 = max_kl_perturbation(actor, obs, actor.std, 0.1, steps=0)
    _, kl10 = max_kl_perturbation(actor, obs, actor.std, 0.1, steps=10)
    assert kl10.mean() > 2 * kl0.mean()


def test_gaussian_kl_closed_form():
    mean = torch.tensor([[0.0, 1.0]])
    mean_hat = torch.tensor([[0.3, 0.5]])
    std = torch.tensor([0.1, 0.2])
    p = torch.distributions.Normal(mean, std)
    q = torch.distributions.Normal(mean_hat, std)
    assert torch.allclose(gaussian_kl(mean, mean_hat, std), torch.distributions.kl_divergence(p, q).sum(-1))


def test_regulariser_gradient_flows_through_perturbed_mean_only():
    torch.manual_seed(0)
    actor = GaussianActor(5, 2, (16,), "tanh", sigma=0.1)
    obs = torch.randn(8, 5)
    loss, kl = sa_regularizer(actor, obs, actor.std, 0.1, steps=3, step_size=0.01)
    assert loss > 0 and kl > 0
    loss.backward()
    assert all(p.grad is not None for p in actor.mean_net.parameters())
