"""GAE and the PPO loss against hand computations on tiny tensors; the flat parameter buffer."""

import math

import pytest
import torch

from prunerl.ppo import gae, ppo_loss_terms


def test_gae_matches_hand_computation_with_termination_and_truncation():
    g, lam = 0.9, 0.8
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    v = torch.tensor([[0.5, 1.0, 1.5, 2.0]])
    nv = torch.tensor([[1.0, 1.5, 7.0, 3.0]])  # V of the *next* observation at each step
    # step 1 truncates (trace cut, but bootstrap from V(next)); step 3 terminates (no bootstrap)
    done = torch.tensor([[False, True, False, True]])
    term = torch.tensor([[False, False, False, True]])
    adv, target = gae(r, v, nv, done, term, g, lam)
    d3 = 4.0 - 2.0                    # terminated: δ = r − V
    d2 = 3.0 + g * 7.0 - 1.5
    d1 = 2.0 + g * 1.5 - 1.0          # truncated: still bootstraps
    d0 = 1.0 + g * 1.0 - 0.5
    a3 = d3
    a2 = d2 + g * lam * a3
    a1 = d1                           # trace cut at done
    a0 = d0 + g * lam * a1
    expected = torch.tensor([[a0, a1, a2, a3]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(target, expected + v, atol=1e-6)


def test_ppo_clipped_objective_and_value_loss_by_hand():
    logp = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.1)])
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -2.0, 3.0])
    value = torch.tensor([1.0, 2.0, 3.0])
    target = torch.tensor([2.0, 2.0, 0.0])
    out = ppo_loss_terms(logp, old, adv, value, target, clip=0.2, normalize_advantage=False)
    # ratios 1.5, 0.5, 1.1: min(rA, clip(r)A) = min(1.5, 1.2)=1.2; min(-1, -1.6)=-1.6; min(3.3,3.3)=3.3
    assert torch.isclose(out["loss_objective"], -torch.tensor((1.2 - 1.6 + 3.3) / 3))
    assert torch.isclose(out["loss_critic"], torch.tensor((1 + 0 + 9) / 3))
    assert torch.isclose(out["clip_fraction"], torch.tensor(2 / 3))
    r = torch.tensor([1.5, 0.5, 1.1])
    assert torch.isclose(out["approx_kl"], ((r - 1) - r.log()).mean())


def test_advantage_normalisation_is_per_minibatch():
    logp = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = ppo_loss_terms(logp, torch.zeros(4), adv, torch.zeros(4), torch.zeros(4), clip=0.2)
    out["loss_objective"].backward()
    norm = (adv - adv.mean()) / (adv.std() + 1e-8)
    # at ratio 1 the gradient of −mean(r·Â) w.r.t. log π is −Â/n
    assert torch.allclose(logp.grad, -norm / 4, atol=1e-6)


def _nets(seed=0):
    from prunerl.models import Critic, GaussianActor

    torch.manual_seed(seed)
    return GaussianActor(5, 2, (16, 16), "tanh", 1.0, learn_std=True), Critic(5, (16, 16), "tanh")


def _loss(actor, critic, x):
    return actor(x).pow(2).sum() + actor.log_std.sum() - critic(x).sum()


def test_flat_parameters_give_the_same_training_as_per_tensor_adam():
    """Clipping + Adam on the one flat buffer == per-tensor clipping + Adam (to float rounding),
    and the modules' own parameters are what the flat optimiser updates."""
    from prunerl.module import FlatParameters

    (a1, c1), (a2, c2) = _nets(), _nets()
    p1 = [*a1.parameters(), *c1.parameters()]
    opt1 = torch.optim.Adam(p1, lr=1e-2)
    flat = FlatParameters([*a2.parameters(), *c2.parameters()])
    opt2 = torch.optim.Adam([flat.param], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        x = torch.randn(8, 5, generator=g)
        opt1.zero_grad()
        _loss(a1, c1, x).backward()
        torch.nn.utils.clip_grad_norm_(p1, 0.5)
        opt1.step()
        flat.zero_grad()
        _loss(a2, c2, x).backward()
        torch.nn.utils.clip_grad_norm_([flat.param], 0.5)
        opt2.step()
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(p1, _nets()[0].parameters()))
    assert moved > 1e-2  # training did move the weights
    for (n, p), q in zip([*a1.named_parameters(), *c1.named_parameters()], [*a2.parameters(), *c2.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_flat_parameters_reattach_dropped_grads_and_refuse_moved_storage():
    from prunerl.module import FlatParameters

    actor, critic = _nets()
    flat = FlatParameters([*actor.parameters(), *critic.parameters()])
    actor.zero_grad(set_to_none=True)  # e.g. someone calls module.zero_grad()
    flat.zero_grad()
    _loss(actor, critic, torch.randn(4, 5)).backward()
    assert float(flat.param.grad.abs().sum()) > 0
    torch.testing.assert_close(flat.param.grad, torch.cat([p.grad.reshape(-1) for p in flat.params]))
    flat.check()
    actor.mean_net[0].weight.data = actor.mean_net[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="no longer lives in the flat parameter buffer"):
        flat.check()


def test_diagnostics_over_a_rollout_are_the_mean_of_the_minibatch_figures():
    """The module logs approx-KL and clip fraction once per rollout from all its log-ratios; with
    equal minibatches that is the mean of what each minibatch would have reported."""
    from prunerl.ppo import ppo_diagnostics

    g = torch.Generator().manual_seed(0)
    chunks = [0.3 * torch.randn(64, generator=g) for _ in range(8)]
    per_mb = [ppo_diagnostics(c, 0.2) for c in chunks]
    whole = ppo_diagnostics(torch.cat(chunks), 0.2)
    for k in ("approx_kl", "clip_fraction"):
        assert torch.isclose(whole[k], torch.stack([d[k] for d in per_mb]).mean()), k
    assert 0 < float(whole["clip_fraction"]) < 1
