"""GAE and the PPO loss against hand computations on tiny tensors."""

import math

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
