"""The learned "optimal" adversary's environment: the agent is the adversary, the victim is frozen.

Training an adversary is an ordinary ``fit`` (same PPO module, collector and run directory) on
:class:`AdversaryEnv`, chosen by ``fit.build_env`` when the config has ``victim=PATH``
(``experiment=adversary``). One step of the adversary's env:

1. the adversary sees the victim's normalised observation s (victim's frozen normaliser);
2. its action a ∈ [-1, 1]^d (clipped) perturbs it: ŝ = s + ε·a, inside the ℓ∞ ball B(s);
3. the frozen victim acts on ŝ: a_v = μ(ŝ) (or a sample of π(·|ŝ), ``adversary.victim_deterministic``);
4. the adversary's reward is r_adv = −r_victim − λ_attack · ‖ŝ − s‖₂².

The similarity penalty (paper App. D: λ_attack = 10) penalises the *size of the perturbation*: the
squared ℓ2 distance between the observation the victim sees and the true one, in normalised
observation units (= ε²·Σ_i a_i², at most ε²·d: 0.62 per step on Hopper at ε = 0.075, against a
victim reward of ~3 per step). It pushes the adversary towards perturbations that are small where
they buy nothing ("severe perturbations are disincentivised", App. E); the ball itself is enforced
by the clip, not by the penalty. Rewards are then scaled by the adversary's own running
normaliser, as for any PPO run.
"""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs import EnvBase, TransformedEnv

from prunerl.envs import DEFAULT_ENGINE, TASKS, MujocoVecEnv, RunningNormalizer, batched_done_spec
from prunerl.models import GaussianActor


class AdversaryEnv(EnvBase):
    """``num_envs`` copies of the victim's task; actions are perturbations of the victim's view."""

    def __init__(self, task: str, victim: GaussianActor, victim_normalizer: dict, num_envs: int, seed: int,
                 eps: float, similarity: float = 10.0, victim_deterministic: bool = True,
                 clip_obs: float = 10.0, engine: str = DEFAULT_ENGINE):
        super().__init__(batch_size=torch.Size([num_envs]), device=torch.device("cpu"))
        self.task = task
        self.env_id = f"adversary:{TASKS[task].env_id}"
        self.eps, self.similarity = float(eps), float(similarity)
        self.victim_deterministic = victim_deterministic
        self.victim = victim.eval().requires_grad_(False)
        self.inner = MujocoVecEnv(TASKS[task].env_id, num_envs, seed=seed, engine=engine)
        d = self.inner.obs_dim
        self.victim_norm = RunningNormalizer(d, num_envs, clip=clip_obs).load_statistics(victim_normalizer).freeze()
        n = (num_envs,)
        self.observation_spec = Composite(
            observation=Unbounded(shape=n + (d,), dtype=torch.float32),
            episode_return=Unbounded(shape=n + (1,), dtype=torch.float32),
            episode_length=Unbounded(shape=n + (1,), dtype=torch.int64),
            victim_return=Unbounded(shape=n + (1,), dtype=torch.float32),
            shape=n,
        )
        self.action_spec = Bounded(low=-1.0, high=1.0, shape=n + (d,), dtype=torch.float32)
        self.reward_spec = Unbounded(shape=n + (1,), dtype=torch.float32)
        self.done_spec = batched_done_spec(num_envs)
        self._s = torch.zeros(num_envs, d)
        self._ep_return = np.zeros((num_envs, 1), dtype=np.float64)
        self._victim_return = np.zeros((num_envs, 1), dtype=np.float64)
        #: the victim's return of every episode finished since the last read (the adversary's
        #: training curve, callbacks/adversary.py, takes and clears it once per rollout)
        self.finished_victim_returns: list[float] = []

    @property
    def obs_dim(self) -> int:
        return self.inner.obs_dim

    def _set_seed(self, seed: int | None) -> None:
        self.inner._set_seed(seed)

    def _out(self, td: TensorDictBase) -> TensorDictBase:
        self._s = self.victim_norm.normalize(td.get("observation"))
        td.set("observation", self._s.clone())
        td.set("episode_return", torch.from_numpy(self._ep_return.astype(np.float32)))
        td.set("victim_return", torch.from_numpy(self._victim_return.astype(np.float32)))
        return td

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        mask = None
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(-1).numpy()
        continuing = self.inner._restored and mask is None  # after load_state(): same episodes
        td = self.inner._reset(tensordict)
        if not continuing:
            rows = slice(None) if mask is None else mask
            self._ep_return[rows] = 0.0
            self._victim_return[rows] = 0.0
        return self._out(td)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        a = tensordict.get("action").clamp(-1, 1)
        s_hat = self._s + self.eps * a
        with torch.no_grad():
            mean = self.victim(s_hat)
            action = mean if self.victim_deterministic else mean + self.victim.std * torch.randn_like(mean)
        td = self.inner._step(TensorDict({"action": action}, batch_size=self.batch_size))
        r_victim = td.get("reward").numpy().astype(np.float64)
        penalty = self.similarity * (self.eps * a).pow(2).sum(-1, keepdim=True).numpy().astype(np.float64)
        reward = -r_victim - penalty
        self._ep_return += reward
        self._victim_return += r_victim
        td.set("reward", torch.from_numpy(reward.astype(np.float32)))
        out = self._out(td)
        done = td.get("done").reshape(-1).numpy()
        self.finished_victim_returns.extend(self._victim_return[done, 0].tolist())
        return out

    # exact resume: the physics and counters are the inner env's; the adversary's totals are ours
    def state(self) -> dict:
        return {"inner": self.inner.state(), "env_id": self.env_id,
                "s": self._s.clone(), "ep_return": self._ep_return.copy(),
                "victim_return": self._victim_return.copy()}

    def load_state(self, state: dict) -> None:
        self.inner.load_state(state["inner"])
        self._s = state["s"].clone()
        self._ep_return[:] = state["ep_return"]
        self._victim_return[:] = state["victim_return"]

    def close(self, *, raise_if_closed: bool = True) -> None:  # noqa: D102
        self.inner.close(raise_if_closed=False)
        super().close(raise_if_closed=raise_if_closed)


def make_adversary_env(task: str, victim: GaussianActor, victim_normalizer: dict, num_envs: int, seed: int, *,
                       eps: float, similarity: float, victim_deterministic: bool, gamma: float = 0.99,
                       clip_obs: float = 10.0, scale_reward: bool = True,
                       engine: str = DEFAULT_ENGINE) -> TransformedEnv:
    """:class:`AdversaryEnv` plus the adversary's own :class:`RunningNormalizer` (as ``make_env``)."""
    base = AdversaryEnv(task, victim, victim_normalizer, num_envs, seed, eps, similarity,
                        victim_deterministic, clip_obs, engine)
    env = TransformedEnv(base, RunningNormalizer(base.obs_dim, num_envs, clip=clip_obs, gamma=gamma,
                                                 scale_reward=scale_reward))
    env.set_seed(seed)
    return env
