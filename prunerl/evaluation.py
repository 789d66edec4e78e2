"""Rolling out a frozen policy for N episodes — the one rollout loop that clean evaluation and
(later) every attack share. The normaliser is loaded from the checkpoint and frozen: evaluation
never moves its statistics.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from prunerl.envs import DEFAULT_ENGINE, make_env, normalizer_of
from prunerl.models import ActorPolicy, GaussianActor

Perturbation = Callable[[torch.Tensor], torch.Tensor]


def frozen_env(normalizer_state: dict, task: str, num_envs: int, seed: int, engine: str = DEFAULT_ENGINE):
    """The task's batched env (on the run's ``env.engine``) with the checkpoint's normaliser loaded
    and frozen."""
    env = make_env(task, num_envs, seed, engine=engine)
    norm = normalizer_of(env)
    norm.load_statistics(normalizer_state).freeze()
    return env


@torch.no_grad()
def collect_transitions(actor: GaussianActor, normalizer_state: dict, task: str, frames: int, *,
                        seed: int = 12345, num_envs: int = 16, deterministic: bool = False,
                        engine: str = DEFAULT_ENGINE) -> dict:
    """``frames`` clean transitions (s, a, r, s', a', terminated) of the victim, flat, for Robust Sarsa.

    ``r`` is the reward scaled by the frozen normaliser (the scale the victim's critic learned).
    Actions are sampled (σ of the policy) by default so that Q sees more than a = μ(s).
    ``next_action`` a' is the action the policy took at s' in the same episode: the next step's
    action of that env. Where the episode ended at s' (the env was reset, so the next step's action
    belongs to a new episode), a' is drawn from the policy at s' instead — what it would have
    taken; only a time-limit end bootstraps from it, a terminal one does not (``terminated``).
    Rows are step-major: row ``t·num_envs + i`` is env ``i`` at step ``t``.
    """
    env = frozen_env(normalizer_state, task, num_envs, seed, engine)
    policy = ActorPolicy(actor, deterministic=deterministic)
    keys = ("observation", "action", "reward", "next_observation", "terminated", "done")
    out: dict[str, list] = {k: [] for k in keys}
    device = next(actor.parameters()).device
    td = env.reset()
    for _ in range(-(-frames // num_envs)):
        obs = td["observation"].to(device)
        action, _ = policy(obs)
        td["action"] = action.cpu()
        td, td_next = env.step_and_maybe_reset(td)
        nxt = td["next"]
        for k, v in (("observation", obs), ("action", action), ("reward", nxt["reward"].squeeze(-1)),
                     ("next_observation", nxt["observation"]), ("terminated", nxt["terminated"].squeeze(-1)),
                     ("done", nxt["done"].squeeze(-1))):
            out[k].append(v.to(device))
        td = td_next
    # a' of step t is the action of step t+1 (same env); after the last step, the policy's next draw
    last_action, _ = policy(td["observation"].to(device))
    next_action = torch.stack([*out["action"][1:], last_action])
    done = torch.stack(out["done"])
    if done.any():  # the episode ended at s': the next row's action is a new episode's
        redraw, _ = policy(torch.stack(out["next_observation"])[done])
        next_action[done] = redraw
    env.close()
    data = {k: torch.cat(v)[:frames] for k, v in out.items() if k != "done"}
    data["next_action"] = next_action.reshape(-1, next_action.shape[-1])[:frames]
    return data


@torch.no_grad()
def run_episodes(actor: GaussianActor, normalizer_state: dict, task: str, episodes: int, *,
                 deterministic: bool = True, seed: int = 12345, num_envs: int | None = None,
                 perturb: Perturbation | None = None, device: str | torch.device = "cpu",
                 engine: str = DEFAULT_ENGINE) -> dict:
    """Run ``episodes`` whole episodes with a frozen normaliser; return per-episode figures.

    Envs get fixed quotas (``episodes`` split evenly over ``num_envs``) so that short episodes are
    not over-represented. ``perturb`` maps normalised observations to the observations the policy
    sees (an attack); the environment itself is never perturbed.
    """
    if episodes <= 0:
        raise ValueError(f"episodes={episodes} must be a positive integer")
    n = min(episodes, 16) if num_envs is None else num_envs
    env = frozen_env(normalizer_state, task, n, seed, engine)
    policy = ActorPolicy(actor, deterministic=deterministic)
    quota = np.array([episodes // n + (i < episodes % n) for i in range(n)])
    finished = np.zeros(n, dtype=int)
    returns, lengths, perturbation = [], [], []
    td = env.reset()
    while (finished < quota).any():
        obs = td["observation"].to(device)
        seen = obs if perturb is None else perturb(obs)
        if perturb is not None:
            perturbation.append((seen - obs).abs().amax(-1).mean().item())
        action, _ = policy(seen)
        td["action"] = action.cpu()
        td, td_next = env.step_and_maybe_reset(td)
        nxt = td["next"]
        for i in nxt["done"].squeeze(-1).nonzero().flatten().tolist():
            if finished[i] < quota[i]:
                returns.append(float(nxt["episode_return"][i, 0]))
                lengths.append(int(nxt["episode_length"][i, 0]))
                finished[i] += 1
        td = td_next
    env.close()
    return {
        "episodes": len(returns),
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "mean_length": float(np.mean(lengths)),
        "returns": returns,
        "lengths": lengths,
        "deterministic": deterministic,
        "mean_perturbation_linf": float(np.mean(perturbation)) if perturbation else 0.0,
    }
