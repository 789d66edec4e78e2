"""``env.engine=gymnasium``: ``num_envs`` Gymnasium MuJoCo v5 envs stepped in a Python loop, the
reference the other engines are tested against (and PruneRL's only engine before the ``mujoco``
one). Optional threads: MuJoCo's ``mj_step`` releases the GIL, so with ``threads=2`` the envs'
physics runs on two cores; each env keeps its own MjData and RNG, so the trajectories are
bit-identical to ``threads=1`` (tests/test_envs.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import gymnasium as gym
import mujoco
import numpy as np

from prunerl.envs.engine import Engine

MJ_STATE = mujoco.mjtState.mjSTATE_INTEGRATION  # qpos, qvel, act, warm start, ...: bit-exact resume


class GymnasiumEngine(Engine):
    name = "gymnasium"

    def __init__(self, env_id: str, num_envs: int, threads: int = 1):
        self.env_id, self.num_envs = env_id, num_envs
        self.envs = [gym.make(env_id, disable_env_checker=True) for _ in range(num_envs)]
        # One MjModel for all envs (they are identical; MuJoCo reads the model, the state lives in
        # each env's MjData): a Hopper model is ~0.5 MB, 32 copies would stream 16 MB through the
        # caches every step. Bit-identical trajectories (tests/test_envs.py).
        for env in self.envs[1:]:
            env.unwrapped.model = self.envs[0].unwrapped.model
        self.obs_dim = self.envs[0].observation_space.shape[0]
        self.action_low = self.envs[0].action_space.low
        self.action_high = self.envs[0].action_space.high
        self.threads = min(threads, num_envs)
        bounds = np.linspace(0, num_envs, self.threads + 1).round().astype(int)
        self._chunks = list(zip(bounds[:-1], bounds[1:]))
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    def reset(self, ids: np.ndarray, seeds: Sequence[int | None]) -> np.ndarray:
        return np.stack([self.envs[i].reset(seed=s)[0] for i, s in zip(ids, seeds)]).reshape(len(ids), self.obs_dim)

    def step(self, action: np.ndarray):
        n = self.num_envs
        obs = np.empty((n, self.obs_dim))
        reward = np.empty(n)
        terminated = np.empty(n, dtype=bool)
        truncated = np.empty(n, dtype=bool)

        def step_envs(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                obs[i], reward[i], terminated[i], truncated[i], _ = self.envs[i].step(action[i])

        if self._pool is None:
            step_envs(0, n)
        else:
            others = [self._pool.submit(step_envs, lo, hi) for lo, hi in self._chunks[1:]]
            step_envs(*self._chunks[0])
            for f in others:
                f.result()
        return obs, reward, terminated, truncated

    def state(self) -> dict:
        envs = []
        for env in self.envs:
            u = env.unwrapped
            buf = np.empty(mujoco.mj_stateSize(u.model, MJ_STATE))
            mujoco.mj_getState(u.model, u.data, buf, MJ_STATE)
            envs.append({"mj_state": buf, "np_random": u.np_random.bit_generator.state,
                         "elapsed_steps": getattr(env, "_elapsed_steps", None)})
        return {"envs": envs}

    def load_state(self, state: dict) -> None:
        for env, s in zip(self.envs, state["envs"]):
            u = env.unwrapped
            mujoco.mj_setState(u.model, u.data, s["mj_state"], MJ_STATE)
            mujoco.mj_forward(u.model, u.data)
            u.np_random.bit_generator.state = s["np_random"]
            if s["elapsed_steps"] is not None:
                env._elapsed_steps = s["elapsed_steps"]
            # OrderEnforcing refuses step() before a reset; the episode is in progress.
            env.get_wrapper_attr("_has_reset")  # raises early if the wrapper chain changed
            _mark_has_reset(env)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        for env in self.envs:
            env.close()


def _mark_has_reset(env: gym.Env) -> None:
    while isinstance(env, gym.Wrapper):
        if hasattr(env, "_has_reset"):
            env._has_reset = True
        env = env.env
