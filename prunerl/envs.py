"""Environments: Gymnasium MuJoCo v5 tasks as one batched TorchRL env, plus normalisation.

Why a batched env of our own rather than ``GymEnv``: TorchRL's per-step cost on CPU is ~4x a
MuJoCo step for one env (REFERENCE.md); ``GymEnv(num_envs=N)`` pays it through N subprocesses and
pipes. :class:`MujocoVecEnv` steps N Gymnasium envs in this process and builds one TensorDict per
batched step, so the overhead is paid once per N frames.

Data conventions (kept by every consumer: collector, attacks, evaluation):
- ``observation`` leaves :class:`RunningNormalizer` normalised and clipped to ``±clip``; the
  ε-ball of the SA regulariser and of every attack lives in this space (DESIGN.md).
- ``reward`` is the scaled reward used for learning; ``episode_return`` / ``episode_length``
  carry the raw (unscaled) running totals, final where ``done`` is set.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import gymnasium as gym
import mujoco
import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, Transform, TransformedEnv


@dataclass(frozen=True)
class Task:
    """A benchmark task: its Gymnasium id and the paper's ℓ∞ budget ε (Sec. 4.2)."""

    name: str
    env_id: str
    eps: float


#: The tasks PruneRL knows (``env=...``). ε from Sec. 4.2; inverted_pendulum is a fast test task
#: that the paper does not use (its ε is our choice).
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("hopper", "Hopper-v5", 0.075),
        Task("walker2d", "Walker2d-v5", 0.05),
        Task("halfcheetah", "HalfCheetah-v5", 0.15),
        Task("ant", "Ant-v5", 0.15),
        Task("inverted_pendulum", "InvertedPendulum-v5", 0.05),
    )
}
ENV_IDS = {t.env_id for t in TASKS.values()}

_MJ_STATE = mujoco.mjtState.mjSTATE_INTEGRATION  # qpos, qvel, act, warm start, ...: bit-exact resume


def batched_done_spec(num_envs: int) -> Composite:
    """``done`` / ``terminated`` / ``truncated`` flags, one per env (TorchRL's done convention)."""
    n = (num_envs,)
    flag = Categorical(2, shape=n + (1,), dtype=torch.bool)
    return Composite(done=flag, terminated=flag.clone(), truncated=flag.clone(), shape=n)


class MujocoVecEnv(EnvBase):
    """``num_envs`` Gymnasium MuJoCo envs stepped in this process as one batched TorchRL env.

    Actions are clipped to the action bounds before stepping (the MuJoCo control cost would
    otherwise see the unclipped action). Truncation comes from Gymnasium's ``TimeLimit``.
    Done envs are reset by TorchRL's partial reset (``_reset`` mask), which the collector issues.
    """

    def __init__(self, env_id: str, num_envs: int, seed: int = 0, threads: int = 1):
        if env_id not in ENV_IDS:
            raise ValueError(f"env_id={env_id!r} is not a known task; allowed: {sorted(ENV_IDS)}")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"env.threads={threads!r} must be a positive integer")
        super().__init__(batch_size=torch.Size([num_envs]), device=torch.device("cpu"))
        self.env_id = env_id
        self.num_envs = num_envs
        self.envs = [gym.make(env_id, disable_env_checker=True) for _ in range(num_envs)]
        # One MjModel for all envs (they are identical; MuJoCo reads the model, the state lives in
        # each env's MjData): a Hopper model is ~0.5 MB, 32 copies would stream 16 MB through the
        # caches every step. Bit-identical trajectories (tests/test_envs.py).
        for env in self.envs[1:]:
            env.unwrapped.model = self.envs[0].unwrapped.model
        obs_dim = self.envs[0].observation_space.shape[0]
        act_space = self.envs[0].action_space
        self._low = act_space.low.astype(np.float64)
        self._high = act_space.high.astype(np.float64)
        n = (num_envs,)
        self.observation_spec = Composite(
            observation=Unbounded(shape=n + (obs_dim,), dtype=torch.float32),
            episode_return=Unbounded(shape=n + (1,), dtype=torch.float32),
            episode_length=Unbounded(shape=n + (1,), dtype=torch.int64),
            shape=n,
        )
        self.action_spec = Bounded(
            low=torch.as_tensor(act_space.low, dtype=torch.float32).expand(n + act_space.shape),
            high=torch.as_tensor(act_space.high, dtype=torch.float32).expand(n + act_space.shape),
            shape=n + act_space.shape,
            dtype=torch.float32,
        )
        self.reward_spec = Unbounded(shape=n + (1,), dtype=torch.float32)
        self.done_spec = batched_done_spec(num_envs)
        self._obs = np.zeros((num_envs, obs_dim), dtype=np.float32)
        self._ep_return = np.zeros((num_envs, 1), dtype=np.float64)
        self._ep_length = np.zeros((num_envs, 1), dtype=np.int64)
        self._seeds: list[int | None] = [seed + i for i in range(num_envs)]
        self._restored = False
        # Stepping in threads: MuJoCo's mj_step (~75% of a Gymnasium Hopper step here) releases the
        # GIL, so with threads=2 the envs' physics runs on both cores. Each env keeps its own
        # MjData and RNG, so the trajectories are bit-identical to threads=1 (tests/test_envs.py).
        self.threads = min(threads, num_envs)
        bounds = np.linspace(0, num_envs, self.threads + 1).round().astype(int)
        self._chunks = list(zip(bounds[:-1], bounds[1:]))
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    @property
    def obs_dim(self) -> int:
        return self._obs.shape[1]

    @property
    def act_dim(self) -> int:
        return self._low.shape[0]

    def _set_seed(self, seed: int | None) -> None:
        self._seeds = [None if seed is None else seed + i for i in range(self.num_envs)]

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        mask = None
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(-1).numpy()
        if self._restored and mask is None:
            # First full reset after load_state(): continue the saved episodes (exact resume).
            self._restored = False
        else:
            for i, env in enumerate(self.envs):
                if mask is None or mask[i]:
                    obs, _ = env.reset(seed=self._seeds[i])
                    self._seeds[i] = None
                    self._obs[i] = obs
                    self._ep_return[i] = 0.0
                    self._ep_length[i] = 0
        false = torch.zeros(self.num_envs, 1, dtype=torch.bool)
        return TensorDict(
            {
                "observation": torch.from_numpy(self._obs.copy()),
                "episode_return": torch.from_numpy(self._ep_return.astype(np.float32)),
                "episode_length": torch.from_numpy(self._ep_length.copy()),
                "done": false,
                "terminated": false.clone(),
                "truncated": false.clone(),
            },
            batch_size=self.batch_size,
        )

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        actions = np.clip(tensordict.get("action").numpy().astype(np.float64), self._low, self._high)
        n = self.num_envs
        reward = np.empty((n, 1), dtype=np.float32)
        terminated = np.empty((n, 1), dtype=bool)
        truncated = np.empty((n, 1), dtype=bool)

        def step_envs(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                obs, r, term, trunc, _ = self.envs[i].step(actions[i])
                self._obs[i] = obs
                reward[i] = r
                terminated[i] = term
                truncated[i] = trunc

        if self._pool is None:
            step_envs(0, n)
        else:
            others = [self._pool.submit(step_envs, lo, hi) for lo, hi in self._chunks[1:]]
            step_envs(*self._chunks[0])
            for f in others:
                f.result()
        self._ep_return += reward
        self._ep_length += 1
        return TensorDict(
            {
                "observation": torch.from_numpy(self._obs.copy()),
                "episode_return": torch.from_numpy(self._ep_return.astype(np.float32)),
                "episode_length": torch.from_numpy(self._ep_length.copy()),
                "reward": torch.from_numpy(reward),
                "done": torch.from_numpy(terminated | truncated),
                "terminated": torch.from_numpy(terminated),
                "truncated": torch.from_numpy(truncated),
            },
            batch_size=self.batch_size,
        )

    # -- exact resume ---------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue every episode bit-for-bit (physics, RNG, counters)."""
        envs = []
        for env in self.envs:
            u = env.unwrapped
            buf = np.empty(mujoco.mj_stateSize(u.model, _MJ_STATE))
            mujoco.mj_getState(u.model, u.data, buf, _MJ_STATE)
            envs.append(
                {
                    "mj_state": buf,
                    "np_random": u.np_random.bit_generator.state,
                    "elapsed_steps": getattr(env, "_elapsed_steps", None),
                }
            )
        return {
            "env_id": self.env_id,
            "envs": envs,
            "obs": self._obs.copy(),
            "ep_return": self._ep_return.copy(),
            "ep_length": self._ep_length.copy(),
            "seeds": list(self._seeds),
        }

    def load_state(self, state: dict) -> None:
        if state["env_id"] != self.env_id or len(state["envs"]) != self.num_envs:
            raise ValueError(
                f"env state is for {len(state['envs'])} x {state['env_id']}, "
                f"this env is {self.num_envs} x {self.env_id}"
            )
        for env, s in zip(self.envs, state["envs"]):
            u = env.unwrapped
            mujoco.mj_setState(u.model, u.data, s["mj_state"], _MJ_STATE)
            mujoco.mj_forward(u.model, u.data)
            u.np_random.bit_generator.state = s["np_random"]
            if s["elapsed_steps"] is not None:
                env._elapsed_steps = s["elapsed_steps"]
            # OrderEnforcing refuses step() before a reset; the episode is in progress.
            env.get_wrapper_attr("_has_reset")  # raises early if the wrapper chain changed
            _mark_has_reset(env)
        self._obs[:] = state["obs"]
        self._ep_return[:] = state["ep_return"]
        self._ep_length[:] = state["ep_length"]
        self._seeds = list(state["seeds"])
        self._restored = True

    def close(self, *, raise_if_closed: bool = True) -> None:  # noqa: D102
        if self._pool is not None:
            self._pool.shutdown()
        for env in self.envs:
            env.close()
        super().close(raise_if_closed=raise_if_closed)


def _mark_has_reset(env: gym.Env) -> None:
    while isinstance(env, gym.Wrapper):
        if hasattr(env, "_has_reset"):
            env._has_reset = True
        env = env.env


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


def make_env(task: str | Task, num_envs: int, seed: int, *, gamma: float = 0.99, clip_obs: float = 10.0,
             scale_reward: bool = True, threads: int = 1) -> TransformedEnv:
    """The training/evaluation env: batched MuJoCo task + :class:`RunningNormalizer`."""
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"env={task!r} is not a known task; allowed: {sorted(TASKS)}")
        task = TASKS[task]
    base = MujocoVecEnv(task.env_id, num_envs, seed=seed, threads=threads)
    env = TransformedEnv(base, RunningNormalizer(base.obs_dim, num_envs, clip=clip_obs, gamma=gamma,
                                                 scale_reward=scale_reward))
    env.set_seed(seed)
    return env


def normalizer_of(env: TransformedEnv) -> RunningNormalizer:
    t = env.transform
    return t if isinstance(t, RunningNormalizer) else next(x for x in t if isinstance(x, RunningNormalizer))
