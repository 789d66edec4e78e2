"""The batched TorchRL env over an engine, and ``make_env`` (task + engine + normaliser).

Why a batched env of our own rather than ``GymEnv``: TorchRL's per-step cost on CPU is ~4x a
MuJoCo step for one env (REFERENCE.md); ``GymEnv(num_envs=N)`` pays it through N subprocesses and
pipes. :class:`MujocoVecEnv` steps N envs in this process through one engine call and builds one
TensorDict per batched step, so the overhead is paid once per N frames.
"""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, TransformedEnv

from prunerl.envs.engine import Engine
from prunerl.envs.normalizer import RunningNormalizer
from prunerl.envs.tasks import ENV_IDS, TASKS, Task

#: ``env.engine`` values. ``mujoco`` is the default: bit-identical to ``gymnasium`` for every task
#: (tests/test_engines.py), with no Python per env in a step; its speed-up is what
#: benchmarks/env_throughput.py measures.
ENGINES = ("gymnasium", "mujoco")
DEFAULT_ENGINE = "mujoco"


def make_engine(engine: str, env_id: str, num_envs: int, threads: int = 1) -> Engine:
    """The engine named ``engine`` running ``num_envs`` copies of ``env_id``."""
    if engine == "gymnasium":
        from prunerl.envs.gymnasium_engine import GymnasiumEngine

        return GymnasiumEngine(env_id, num_envs, threads)
    if engine == "mujoco":
        from prunerl.envs.mujoco_engine import MujocoEngine

        return MujocoEngine(env_id, num_envs, threads)
    raise ValueError(f"env.engine={engine!r} is not allowed; allowed: {list(ENGINES)}")


def batched_done_spec(num_envs: int) -> Composite:
    """``done`` / ``terminated`` / ``truncated`` flags, one per env (TorchRL's done convention)."""
    n = (num_envs,)
    flag = Categorical(2, shape=n + (1,), dtype=torch.bool)
    return Composite(done=flag, terminated=flag.clone(), truncated=flag.clone(), shape=n)


class MujocoVecEnv(EnvBase):
    """``num_envs`` copies of a Gymnasium MuJoCo v5 task, stepped in this process by ``engine``
    (``gymnasium`` | ``mujoco``, see :mod:`prunerl.envs.engine`) as one batched TorchRL env.

    Actions are clipped to the action bounds before stepping (the MuJoCo control cost would
    otherwise see the unclipped action). Truncation is the task's time limit (Gymnasium's
    ``TimeLimit``). Done envs are reset by TorchRL's partial reset (``_reset`` mask), which the
    collector issues; env ``i``'s first reset uses seed ``seed + i``, later ones continue its RNG.
    """

    def __init__(self, env_id: str, num_envs: int, seed: int = 0, threads: int = 1,
                 engine: str = DEFAULT_ENGINE):
        if env_id not in ENV_IDS:
            raise ValueError(f"env_id={env_id!r} is not a known task; allowed: {sorted(ENV_IDS)}")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"env.threads={threads!r} must be a positive integer")
        if engine not in ENGINES:
            raise ValueError(f"env.engine={engine!r} is not allowed; allowed: {list(ENGINES)}")
        super().__init__(batch_size=torch.Size([num_envs]), device=torch.device("cpu"))
        self.env_id = env_id
        self.num_envs = num_envs
        self.engine = make_engine(engine, env_id, num_envs, threads)
        obs_dim = self.engine.obs_dim
        low, high = self.engine.action_low, self.engine.action_high
        self._low = low.astype(np.float64)
        self._high = high.astype(np.float64)
        n = (num_envs,)
        self.observation_spec = Composite(
            observation=Unbounded(shape=n + (obs_dim,), dtype=torch.float32),
            episode_return=Unbounded(shape=n + (1,), dtype=torch.float32),
            episode_length=Unbounded(shape=n + (1,), dtype=torch.int64),
            shape=n,
        )
        self.action_spec = Bounded(
            low=torch.as_tensor(low, dtype=torch.float32).expand(n + low.shape),
            high=torch.as_tensor(high, dtype=torch.float32).expand(n + high.shape),
            shape=n + low.shape,
            dtype=torch.float32,
        )
        self.reward_spec = Unbounded(shape=n + (1,), dtype=torch.float32)
        self.done_spec = batched_done_spec(num_envs)
        self._obs = np.zeros((num_envs, obs_dim), dtype=np.float32)
        self._ep_return = np.zeros((num_envs, 1), dtype=np.float64)
        self._ep_length = np.zeros((num_envs, 1), dtype=np.int64)
        self._seeds: list[int | None] = [seed + i for i in range(num_envs)]
        self._restored = False

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
            ids = np.arange(self.num_envs) if mask is None else np.flatnonzero(mask)
            if len(ids):
                self._obs[ids] = self.engine.reset(ids, [self._seeds[i] for i in ids])
                for i in ids:
                    self._seeds[i] = None
                self._ep_return[ids] = 0.0
                self._ep_length[ids] = 0
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
        obs, reward, terminated, truncated = self.engine.step(actions)
        n = self.num_envs
        self._obs[:] = obs
        reward = reward.astype(np.float32).reshape(n, 1)
        terminated = terminated.reshape(n, 1)
        truncated = truncated.reshape(n, 1)
        self._ep_return += reward
        self._ep_length += 1
        return TensorDict(
            {
                "observation": torch.from_numpy(self._obs.copy()),
                "episode_return": torch.from_numpy(self._ep_return.astype(np.float32)),
                "episode_length": torch.from_numpy(self._ep_length.copy()),
                "reward": torch.from_numpy(reward),
                "done": torch.from_numpy(terminated | truncated),
                "terminated": torch.from_numpy(terminated.copy()),
                "truncated": torch.from_numpy(truncated.copy()),
            },
            batch_size=self.batch_size,
        )

    # -- exact resume ---------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to continue every episode bit-for-bit (physics, RNG, counters); the
        same layout for every engine, so a run may resume on another engine."""
        return {
            "env_id": self.env_id,
            "engine": self.engine.name,
            **self.engine.state(),
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
        self.engine.load_state(state)
        self._obs[:] = state["obs"]
        self._ep_return[:] = state["ep_return"]
        self._ep_length[:] = state["ep_length"]
        self._seeds = list(state["seeds"])
        self._restored = True

    def close(self, *, raise_if_closed: bool = True) -> None:  # noqa: D102
        self.engine.close()
        super().close(raise_if_closed=raise_if_closed)


def make_env(task: str | Task, num_envs: int, seed: int, *, gamma: float = 0.99, clip_obs: float = 10.0,
             scale_reward: bool = True, threads: int = 1, engine: str = DEFAULT_ENGINE) -> TransformedEnv:
    """The training/evaluation env: batched MuJoCo task + :class:`RunningNormalizer`."""
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"env={task!r} is not a known task; allowed: {sorted(TASKS)}")
        task = TASKS[task]
    base = MujocoVecEnv(task.env_id, num_envs, seed=seed, threads=threads, engine=engine)
    env = TransformedEnv(base, RunningNormalizer(base.obs_dim, num_envs, clip=clip_obs, gamma=gamma,
                                                 scale_reward=scale_reward))
    env.set_seed(seed)
    return env
