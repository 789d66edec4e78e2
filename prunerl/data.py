"""Collection: a TorchRL ``Collector`` feeding the LightningModule, one rollout per Lightning epoch.

Alg. 1 lines 3–5: collect ``frames_per_batch`` frames with the current actor, compute Â and R̂ with
the current critic, then yield ``epochs × minibatches`` shuffled minibatches. The rollout for
iteration k+1 is collected when Lightning starts epoch k+1, i.e. after every update of iteration
k — Lightning's one-batch prefetch stays inside a rollout, so the policy is never stale.

The datamodule's ``state_dict`` (saved in every checkpoint by Lightning) carries everything needed
to continue bit-for-bit: frame count, observation/reward normaliser, env physics and RNG, the
minibatch generator and torch's global RNG (which samples the actions).
"""

from __future__ import annotations

import time
from collections import deque

import lightning as L
import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torchrl.collectors import Collector

from torchrl.envs import TransformedEnv

from prunerl.divergence import check, normalizer_statistics
from prunerl.envs import normalizer_of
from prunerl.models import ActorPolicy, Critic, GaussianActor
from prunerl.ppo import gae


def weights_fingerprint(module: torch.nn.Module) -> float:
    """A cheap checksum of a module's parameters (float64 sum of Σ|w| and Σw)."""
    return float(sum(p.detach().double().abs().sum() + p.detach().double().sum() for p in module.parameters()))


class Rollout:
    """The iterable Lightning sees for one epoch: one rollout's minibatches, collected lazily."""

    def __init__(self, dm: "RolloutDataModule"):
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.updates_per_rollout

    def __iter__(self):
        dm = self.dm
        batch = dm.collect()
        n, mb = batch.shape[0], dm.minibatch_size
        keys = list(batch.keys())
        for _ in range(dm.epochs):
            perm = torch.randperm(n, generator=dm.generator).to(batch.device)
            # Shuffle each leaf once per epoch, then hand out contiguous views: the same
            # minibatches as ``batch[idx] for idx in perm.split(mb)``, without a TensorDict
            # index per update (~0.1 ms each, a tenth of a 64x64 update).
            shuffled = {k: batch.get(k)[perm] for k in keys}
            for start in range(0, n, mb):
                size = min(mb, n - start)
                yield TensorDict._new_unsafe({k: v[start:start + size] for k, v in shuffled.items()},
                                             batch_size=torch.Size([size]), device=batch.device)


class RolloutDataModule(L.LightningDataModule):
    """``env`` is a batched TorchRL env whose transform holds a :class:`RunningNormalizer` and
    whose base env has ``state()`` / ``load_state()`` (see :func:`prunerl.envs.make_env`)."""

    def __init__(self, env: TransformedEnv, actor: GaussianActor, critic: Critic, *,
                 frames_per_batch: int, epochs: int, minibatches: int, gamma: float, lmbda: float,
                 seed: int, device: torch.device, return_window: int = 20):
        super().__init__()
        self.actor, self.critic = actor, critic
        self.num_envs, self.frames_per_batch = env.batch_size[0], frames_per_batch
        self.epochs, self.minibatches = epochs, minibatches
        self.minibatch_size = frames_per_batch // minibatches
        self.gamma, self.lmbda = gamma, lmbda
        self.device = torch.device(device)
        self.env = env
        self.normalizer = normalizer_of(self.env)
        self.generator = torch.Generator().manual_seed(seed)
        self.frames = 0
        self.episodes = 0
        self.recent_returns: deque[float] = deque(maxlen=return_window)
        self.recent_lengths: deque[int] = deque(maxlen=return_window)
        self.collect_time = 0.0
        self.last_rollout: TensorDictBase | None = None  # the newest rollout (flat), for callbacks
        # (t, fingerprint of the weights the collector's policy held) at each collection: the
        # evidence that rollouts use the newest weights (tests/test_fit.py checks it)
        self.collection_log: list[tuple[int, float]] = []
        self.collector: Collector | None = None
        self._collector_iter = None
        self._pending_rng: torch.Tensor | None = None
        self.policy = TensorDictModule(ActorPolicy(actor), in_keys=["observation"],
                                       out_keys=["action", "sample_log_prob"])

    @property
    def updates_per_rollout(self) -> int:
        return self.epochs * self.minibatches

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # the rollout is stored on the learner's device already

    def train_dataloader(self):
        return Rollout(self)

    def _make_collector(self):
        collector = Collector(self.env, self.policy, frames_per_batch=self.frames_per_batch,
                              total_frames=-1, policy_device=self.device, storing_device=self.device,
                              env_device="cpu", trust_policy=True,
                              auto_register_policy_transforms=False,
                              track_traj_ids=False)  # GAE reads done flags; ids cost ~3% of collection
        self.collector = collector
        return iter(collector)

    @torch.no_grad()
    def collect(self) -> TensorDictBase:
        """One rollout with the newest actor, then Â and R̂ with the newest critic (flattened)."""
        t0 = time.perf_counter()
        if self._collector_iter is None:
            self._collector_iter = self._make_collector()
            if self._pending_rng is not None:  # after resume: the RNG as it was at the checkpoint
                torch.set_rng_state(self._pending_rng)
                self._pending_rng = None
        if self.trainer is not None:
            self.collection_log.append((self.trainer.global_step, weights_fingerprint(self.collector.policy)))
        data = next(self._collector_iter)
        nxt = data["next"]
        value = self.critic(data["observation"])
        next_value = self.critic(nxt["observation"])
        adv, target = gae(nxt["reward"].squeeze(-1), value, next_value, nxt["done"].squeeze(-1),
                          nxt["terminated"].squeeze(-1), self.gamma, self.lmbda)
        done = nxt["done"].squeeze(-1)
        if done.any():
            rets = nxt["episode_return"].squeeze(-1)[done].tolist()
            lens = nxt["episode_length"].squeeze(-1)[done].tolist()
            self.recent_returns.extend(rets)
            self.recent_lengths.extend(lens)
            self.episodes += len(rets)
        self.frames += data.numel()
        flat = data.select("observation", "action", "sample_log_prob").reshape(-1)
        flat.set("advantage", adv.reshape(-1))
        flat.set("value_target", target.reshape(-1))
        # a physics blow-up shows here first (Gymnasium's "simulation is unstable" states)
        check(self.trainer.global_step if self.trainer is not None else 0, [
            ("observation normaliser statistic", normalizer_statistics(self.normalizer)),
            ("rollout", {"observation": data["observation"], "next observation": nxt["observation"],
                         "reward": nxt["reward"], "advantage": adv, "value target": target})])
        self.collect_time += time.perf_counter() - t0
        self.last_rollout = flat
        return flat

    @property
    def train_return(self) -> float:
        return float(np.mean(self.recent_returns)) if self.recent_returns else float("nan")

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "task": self.env.base_env.env_id,
            "frames": self.frames,
            "episodes": self.episodes,
            "recent_returns": list(self.recent_returns),
            "recent_lengths": list(self.recent_lengths),
            "normalizer": self.normalizer.state_dict(),
            "env": self.env.base_env.state(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.frames = state["frames"]
        self.episodes = state["episodes"]
        self.recent_returns.extend(state["recent_returns"])
        self.recent_lengths.extend(state["recent_lengths"])
        self.normalizer.load_state_dict(state["normalizer"])
        self.env.base_env.load_state(state["env"])
        self.generator.set_state(state["generator"])
        self._pending_rng = state["torch_rng"]
        self._collector_iter = None
