"""Actor and critic (paper App. D): separate 2-layer MLPs, hidden 256, tanh or ReLU,
orthogonal init, zero biases. The actor outputs the mean μ(s) of a diagonal Gaussian whose σ is
fixed (0.1, the paper's choice) or a learned state-independent log σ (an option; recorded in the
run's config as ``algo.model.learn_std``).

The mean network is a plain ``nn.Sequential`` of ``nn.Linear`` and activations, so the pruning and
Lipschitz code can walk its ``Linear`` layers in order (Thm. 1 is stated for exactly this shape).
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...] | list[int], activation: str,
        out_gain: float) -> nn.Sequential:
    """MLP with orthogonal init (gain √2 hidden, ``out_gain`` output) and zero biases."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not allowed; allowed: {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(dims[-1], out_dim))
    for i, m in enumerate(x for x in layers if isinstance(x, nn.Linear)):
        last = i == len(hidden)
        nn.init.orthogonal_(m.weight, gain=out_gain if last else math.sqrt(2))
        nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class GaussianActor(nn.Module):
    """π_θ(a|s) = N(μ_θ(s), diag(σ²)) with σ fixed or a learned state-independent log σ."""

    def __init__(self, obs_dim: int, act_dim: int, hidden=(256, 256), activation: str = "tanh",
                 sigma: float = 0.1, learn_std: bool = False):
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"algo.model.sigma={sigma} must be > 0")
        self.mean_net = mlp(obs_dim, act_dim, hidden, activation, out_gain=0.01)
        log_std = torch.full((act_dim,), math.log(sigma))
        self.learn_std = learn_std
        if learn_std:
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean μ_θ(s)."""
        return self.mean_net(obs)

    @property
    def std(self) -> torch.Tensor:
        return self.log_std.exp()

    def log_prob(self, mean: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Σ_i log N(a_i; μ_i, σ_i²) over the action dimension."""
        z = (action - mean) / self.std
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> torch.Tensor:
        """Entropy of the diagonal Gaussian (state-independent)."""
        return (self.log_std + 0.5 * math.log(2 * math.pi * math.e)).sum()


class Critic(nn.Module):
    """V_φ(s): a value MLP of the same shape as the actor's."""

    def __init__(self, obs_dim: int, hidden=(256, 256), activation: str = "tanh"):
        super().__init__()
        self.value_net = mlp(obs_dim, 1, hidden, activation, out_gain=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value_net(obs).squeeze(-1)


class ActorPolicy(nn.Module):
    """What the collector runs: s ↦ (a, log π(a|s)). Stochastic by default; deterministic
    (a = μ(s)) for evaluation. Shares its parameters with the learner's actor — it *is* the actor,
    so a rollout always sees the newest weights."""

    def __init__(self, actor: GaussianActor, deterministic: bool = False):
        super().__init__()
        self.actor = actor
        self.deterministic = deterministic

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            mean = self.actor(observation)
            if self.deterministic:
                action = mean
            else:
                action = mean + self.actor.std * torch.randn_like(mean)
            return action, self.actor.log_prob(mean, action)
