"""Observation normalisation and reward scaling: the transform every batched env carries.

Data conventions (kept by every consumer: collector, attacks, evaluation):
- ``observation`` leaves :class:`RunningNormalizer` normalised and clipped to ``±clip``; the
  ε-ball of the SA regulariser and of every attack lives in this space (DESIGN.md).
- ``reward`` is the scaled reward used for learning; ``episode_return`` / ``episode_length``
  carry the raw (unscaled) running totals, final where ``done`` is set.
"""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.envs import Transform, TransformedEnv


class RunningNormalizer(Transform):
    """Observation normalisation and reward scaling with running statistics.

    Observations: ``clip((o - mean) / sqrt(var + 1e-8), ±clip)``, statistics updated from every
    stepped observation (Welford / parallel-variance update, infinite memory as in SA-PPO and
    SB3's ``VecNormalize``). Rewards: divided by the running std of the discounted return
    (``γ``), the usual PPO reward scaling. Reset observations are normalised but do not update
    the statistics, so a resumed run sees the same statistics as an unsplit one.

    TorchRL's ``VecNormV2`` was not used: it keeps an exponential moving average (decay 0.9999)
    and normalises rewards by reward statistics, not return statistics, which differs from the
    SA-PPO reference this project reproduces.

    ``frozen`` stops every update (evaluation and attacks); the statistics are buffers, so they
    travel in ``state_dict`` and therefore in checkpoints.
    """

    def __init__(self, obs_dim: int, num_envs: int, clip: float = 10.0, gamma: float = 0.99,
                 scale_reward: bool = True, eps: float = 1e-8):
        super().__init__(in_keys=["observation"], out_keys=["observation"])
        self.clip = float(clip)
        self.gamma = float(gamma)
        self.scale_reward = scale_reward
        self.eps = eps
        self.frozen = False
        self.register_buffer("obs_mean", torch.zeros(obs_dim, dtype=torch.float64))
        self.register_buffer("obs_var", torch.ones(obs_dim, dtype=torch.float64))
        self.register_buffer("obs_count", torch.tensor(1e-4, dtype=torch.float64))
        self.register_buffer("ret_var", torch.ones((), dtype=torch.float64))
        self.register_buffer("ret_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ret_count", torch.tensor(1e-4, dtype=torch.float64))
        self.register_buffer("running_return", torch.zeros(num_envs, dtype=torch.float64))

    def load_statistics(self, state: dict) -> "RunningNormalizer":
        """Load a checkpoint's observation/return statistics, but not its per-env running
        return (that belongs to the training envs, whose number may differ from these)."""
        self.load_state_dict({k: v for k, v in state.items() if k != "running_return"}, strict=False)
        return self

    def freeze(self) -> "RunningNormalizer":
        self.frozen = True
        return self

    def unfreeze(self) -> "RunningNormalizer":
        self.frozen = False
        return self

    @staticmethod
    def _update(mean, var, count, x):
        """Chan et al. parallel update of mean/variance with a batch ``x`` (first dim is the batch).

        ``mean``, ``var``, ``count`` are float64 CPU buffers, updated in place through NumPy views
        (on arrays this small NumPy's per-call cost is a fraction of torch's: this runs twice per
        env step)."""
        mean, var, count = mean.numpy(), var.numpy(), count.numpy()
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        n = x.shape[0]
        b_mean = np.add.reduce(x, 0) / n
        d = x - b_mean
        b_m2 = np.add.reduce(d * d, 0)  # n × the batch's (population) variance
        c = float(count)
        tot = c + n
        delta = b_mean - mean
        var[...] = (var * c + b_m2 + delta * delta * (c * n / tot)) / tot
        mean += delta * (n / tot)
        count[...] = tot

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """Normalise raw observations with the current statistics (no update)."""
        mean = self.obs_mean.to(obs.device, torch.float32)
        std = (self.obs_var + self.eps).sqrt().to(obs.device, torch.float32)
        return ((obs - mean) / std).clamp(-self.clip, self.clip)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        if "_reset" in tensordict.keys() and not self.frozen:
            self.running_return[tensordict.get("_reset").reshape(-1)] = 0.0
        tensordict_reset.set("observation", self.normalize(tensordict_reset.get("observation")))
        return tensordict_reset

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        obs = next_tensordict.get("observation")
        if not self.frozen:
            self._update(self.obs_mean, self.obs_var, self.obs_count,
                         obs.numpy().reshape(-1, obs.shape[-1]).astype(np.float64))
        next_tensordict.set("observation", self.normalize(obs))
        if self.scale_reward:
            reward = next_tensordict.get("reward")
            if not self.frozen:
                running = self.running_return.numpy()
                running *= self.gamma
                running += reward.numpy().reshape(-1)
                self._update(self.ret_mean, self.ret_var, self.ret_count, running)
            scale = (self.ret_var + self.eps).sqrt().to(torch.float32)
            next_tensordict.set("reward", (reward / scale).clamp(-self.clip, self.clip))
        return next_tensordict

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        tensordict.set("observation", self.normalize(tensordict.get("observation")))
        return tensordict



def normalizer_of(env: TransformedEnv) -> RunningNormalizer:
    t = env.transform
    return t if isinstance(t, RunningNormalizer) else next(x for x in t if isinstance(x, RunningNormalizer))
