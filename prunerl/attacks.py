"""State-adversarial attacks (paper Sec. 4.3, Table 1; SA-PPO reference, Zhang et al. 2020).

Every attack here is a *perturbation*: a function ``perturb(s) -> ŝ`` on a batch of normalised
observations (one row per env), applied at every control step by
:func:`prunerl.evaluation.run_episodes`, with ŝ always inside the ℓ∞ ball B(s) of radius ε
(:func:`in_ball` clamps and the tests check it). The environment itself is never perturbed.

- ``random``:  ŝ ~ U(B(s)).
- ``critic``:  value-guided; projected sign-gradient *descent* on the victim's V(ŝ).
- ``mad``:     maximise KL(π(·|s) ‖ π(·|ŝ)) — :func:`prunerl.sa.max_kl_perturbation`, the same
               inner maximisation as the SA regulariser (one home, not a copy).
- ``rs``:      Robust Sarsa; a Q(s, a) (:class:`QNetwork`, 64-64 tanh) trained on clean victim
               transitions (:func:`train_robust_sarsa`), then projected sign-gradient descent on
               Q(s, μ(ŝ)).
- ``optimal``: a learned adversary policy ν (trained by PPO, :mod:`prunerl.adversary`) whose
               action a ∈ [-1, 1]^d gives ŝ = s + ε·a.

Gradient attacks follow the reference: ``steps`` steps of size ``step_size`` (default ε/10) from a
random start; unlike the reference, the best point seen per state is returned (never worse than
the start). Pure torch: no Lightning, Hydra or environments here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from prunerl.models import mlp
from prunerl.sa import max_kl_perturbation

#: every attack name; ``evaluation.attacks`` / ``attacks=`` must be a subset
ATTACKS = ("random", "critic", "mad", "rs", "optimal")
#: attacks that train a model first (opt-in; cached beside the victim's checkpoint)
TRAINED_ATTACKS = ("rs", "optimal")

Perturbation = Callable[[torch.Tensor], torch.Tensor]


def project(s_hat: torch.Tensor, obs: torch.Tensor, eps: float) -> torch.Tensor:
    """Π_B(s)(ŝ): clamp ŝ into the ℓ∞ ball of radius ε around s."""
    return torch.max(torch.min(s_hat, obs + eps), obs - eps)


def in_ball(perturb: Perturbation, eps: float) -> Perturbation:
    """Wrap an attack so that its output is always inside B(s) (projection as the last step).

    The attack's own output stays reachable as ``.unclamped``: every attack must already keep
    ŝ inside B(s) by itself (tests/test_attacks.py checks it); this clamp is a second guard.
    """

    def perturbed(obs: torch.Tensor) -> torch.Tensor:
        return project(perturb(obs).detach(), obs, eps)

    perturbed.eps = eps  # type: ignore[attr-defined]
    perturbed.unclamped = perturb  # type: ignore[attr-defined]
    return perturbed


def projected_sign_gradient(objective: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor,
                            eps: float, steps: int = 10, step_size: float | None = None,
                            random_start: bool = True, maximize: bool = False,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Minimise (or maximise) a per-row ``objective(ŝ)`` over B(s) by projected sign-gradient steps.

    ŝ₀ = s + U(−α, α) (random start, as the reference's critic attack) or s; then
    ŝ ← Π_B(ŝ ∓ α·sign(∇objective)). Returns the best ŝ seen per row (detached). Parameters of the
    networks inside ``objective`` get no gradients (inputs are differentiated with autograd.grad).
    """
    obs = obs.detach()
    alpha = eps / 10 if step_size is None else step_size
    if eps == 0 or (steps == 0 and not random_start):
        return obs.clone()
    sign = 1.0 if maximize else -1.0
    lo, hi = obs - eps, obs + eps
    if random_start:
        u = torch.rand(obs.shape, device=obs.device, dtype=obs.dtype, generator=generator)
        s_hat = (obs + alpha * (2 * u - 1)).clamp(lo, hi)
    else:
        s_hat = obs.clone()
    best, best_val = s_hat.clone(), None
    for i in range(steps + 1):
        s_hat.requires_grad_(True)
        with torch.enable_grad():
            val = objective(s_hat)
            grad = torch.autograd.grad(val.sum(), s_hat)[0] if i < steps else None
        with torch.no_grad():
            score = sign * val  # larger is better
            if best_val is None:
                best_val = score.clone()
            better = score > best_val
            best = torch.where(better.unsqueeze(-1), s_hat, best)
            best_val = torch.where(better, score, best_val)
            if grad is None:
                break
            s_hat = torch.add(s_hat, grad.sign(), alpha=sign * alpha).clamp_(lo, hi)
    return best.detach()


# -- the five attacks ---------------------------------------------------------------------------
def random_attack(eps: float, generator: torch.Generator | None = None) -> Perturbation:
    """ŝ uniform in B(s)."""

    def perturb(obs):
        u = torch.rand(obs.shape, device=obs.device, dtype=obs.dtype, generator=generator)
        return obs + eps * (2 * u - 1)

    return in_ball(perturb, eps)


def critic_attack(critic: nn.Module, eps: float, steps: int = 10, step_size: float | None = None,
                  random_start: bool = True, generator: torch.Generator | None = None) -> Perturbation:
    """Value-guided: ŝ ≈ argmin_{ŝ∈B(s)} V(ŝ) with the victim's own critic."""
    return in_ball(lambda obs: projected_sign_gradient(critic, obs, eps, steps, step_size, random_start,
                                                       generator=generator), eps)


def mad_attack(actor: nn.Module, std: torch.Tensor, eps: float, steps: int = 10,
               step_size: float | None = None, random_start: bool = True,
               generator: torch.Generator | None = None) -> Perturbation:
    """MAD: ŝ ≈ argmax_{ŝ∈B(s)} KL(π(·|s) ‖ π(·|ŝ)) — the SA regulariser's inner maximisation."""
    return in_ball(lambda obs: max_kl_perturbation(actor, obs, std, eps, steps, step_size, random_start,
                                                   generator=generator)[0], eps)


def rs_attack(q: "QNetwork", actor: nn.Module, eps: float, steps: int = 10,
              step_size: float | None = None, random_start: bool = True,
              generator: torch.Generator | None = None) -> Perturbation:
    """Robust Sarsa: ŝ ≈ argmin_{ŝ∈B(s)} Q(s, μ(ŝ)) with a Q trained by :func:`train_robust_sarsa`."""

    def perturb(obs):
        return projected_sign_gradient(lambda s_hat: q(obs, actor(s_hat)), obs, eps, steps, step_size,
                                       random_start, generator=generator)

    return in_ball(perturb, eps)


def optimal_attack(adversary: nn.Module, eps: float,
                   adversary_obs: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Perturbation:
    """Learned adversary ν: ŝ = s + ε·clip(ν(s), −1, 1), ν's mean action (deterministic).

    ``adversary_obs`` maps the victim's normalised observation to what ν was trained on (its own
    frozen normaliser, see :mod:`prunerl.adversary`).
    """

    def perturb(obs):
        z = obs if adversary_obs is None else adversary_obs(obs)
        with torch.no_grad():
            return obs + eps * adversary(z).clamp(-1, 1)

    return in_ball(perturb, eps)


# -- Robust Sarsa -------------------------------------------------------------------------------
class QNetwork(nn.Module):
    """Q(s, a): an MLP on [s, a] (the reference's 64-64 tanh)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden=(64, 64), activation: str = "tanh"):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden, activation, out_gain=1.0)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], -1)).squeeze(-1)


def td_loss(q: QNetwork, batch: dict[str, torch.Tensor], gamma: float) -> torch.Tensor:
    """Sarsa TD loss E[(Q(s,a) − (r + γ(1−term)·Q(s', a')))²], target detached.

    a' (``next_action``) is the action the victim's policy took at s' in the same episode
    (:func:`prunerl.evaluation.collect_transitions`): Sarsa evaluates the policy that was run, as
    the SA-PPO reference does. Terminal transitions do not bootstrap.
    """
    with torch.no_grad():
        next_q = q(batch["next_observation"], batch["next_action"])
        target = batch["reward"] + gamma * (1 - batch["terminated"].float()) * next_q
    return (q(batch["observation"], batch["action"]) - target).pow(2).mean()


def robustness_penalty(q: QNetwork, batch: dict[str, torch.Tensor], q_eps: float, steps: int = 3,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """E[max_{‖â−a‖∞≤ε_Q} (Q(s,â) − Q(s,a))²]: Q must be smooth in the action the attack will move.

    The reference bounds this maximum with a convex relaxation; here it is found by a few projected
    sign-gradient steps (a lower bound of the same maximum).
    """
    obs, action = batch["observation"], batch["action"]
    with torch.no_grad():
        q0 = q(obs, action)
    a_hat = projected_sign_gradient(lambda a: (q(obs, a) - q0).pow(2), action, q_eps, steps,
                                    q_eps / 2, random_start=True, maximize=True, generator=generator)
    return (q(obs, a_hat) - q(obs, action)).pow(2).mean()


def train_robust_sarsa(q: QNetwork, data: dict[str, torch.Tensor], *, gamma: float = 0.99,
                       epochs: int = 10, minibatches: int = 32, lr: float = 1e-3, reg: float = 0.1,
                       q_eps: float = 0.02, generator: torch.Generator | None = None) -> list[float]:
    """Fit Q to ``data`` (flat transitions with ``next_action``) with TD loss + ``reg`` ×
    :func:`robustness_penalty` (ε_Q = ``q_eps``).

    Returns the TD loss over the whole of ``data`` before training and after each epoch.
    """
    opt = torch.optim.Adam(q.parameters(), lr=lr)
    n = data["observation"].shape[0]
    mb = max(1, n // minibatches)
    def full_td() -> float:
        with torch.no_grad():
            return float(td_loss(q, data, gamma))

    history = [full_td()]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - mb + 1, mb):
            idx = perm[start:start + mb]
            batch = {k: v[idx] for k, v in data.items()}
            loss = td_loss(q, batch, gamma)
            if reg > 0:
                loss = loss + reg * robustness_penalty(q, batch, q_eps, generator=generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history.append(full_td())
    return history
