"""PPO maths, free of Lightning and TorchRL modules: GAE and the clipped objective.

GAE is TorchRL's functional ``generalized_advantage_estimate`` (time on dim -2); it bootstraps
through truncation (``done`` cuts the trace, only ``terminated`` drops the next value).
"""

from __future__ import annotations

import torch
from torchrl.objectives.value.functional import generalized_advantage_estimate


def gae(reward, value, next_value, done, terminated, gamma: float, lmbda: float):
    """Advantages Â and value targets R̂ = Â + V for ``[*B, T]`` tensors (Alg. 1, line 4)."""
    adv, target = generalized_advantage_estimate(
        gamma, lmbda, value.unsqueeze(-1), next_value.unsqueeze(-1), reward.unsqueeze(-1),
        done.unsqueeze(-1), terminated.unsqueeze(-1),
    )
    return adv.squeeze(-1), target.squeeze(-1)


def ppo_loss_terms(logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor,
                   value: torch.Tensor, value_target: torch.Tensor, clip: float,
                   normalize_advantage: bool = True, diagnostics: bool = True) -> dict[str, torch.Tensor]:
    """The clipped surrogate and the value loss, each as a positive loss to minimise.

    - ``loss_objective`` = −E[min(r Â, clip(r, 1−c, 1+c) Â)], r = exp(log π − log π_old)
    - ``loss_critic`` = E[(V − R̂)²] (SB3's form; CleanRL halves it)
    - ``log_ratio``: log r, detached — for :func:`ppo_diagnostics` over many minibatches at once
    - with ``diagnostics``: :func:`ppo_diagnostics` of this minibatch.
    """
    if normalize_advantage and advantage.numel() > 1:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    terms = {
        "loss_objective": -surrogate.mean(),
        "loss_critic": (value - value_target).pow(2).mean(),
        "log_ratio": log_ratio.detach(),
    }
    if diagnostics:
        terms.update(ppo_diagnostics(terms["log_ratio"], clip))
    return terms


@torch.no_grad()
def ppo_diagnostics(log_ratio: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    """``approx_kl`` = E[(r−1) − log r] and ``clip_fraction`` = P(|r−1| > c) over the given samples."""
    ratio = log_ratio.exp()
    return {
        "approx_kl": ((ratio - 1) - log_ratio).mean(),
        "clip_fraction": ((ratio - 1).abs() > clip).float().mean(),
    }
