"""The engine interface: what the batched TorchRL env (:class:`prunerl.envs.vec_env.MujocoVecEnv`)
needs from whatever runs ``num_envs`` copies of a Gymnasium MuJoCo v5 task.

Engines (``env.engine``), one module each:

- ``gymnasium`` (:mod:`prunerl.envs.gymnasium_engine`): ``num_envs`` Gymnasium envs stepped in a
  Python loop — the reference every other engine is tested against;
- ``mujoco`` (:mod:`prunerl.envs.mujoco_engine`): the task definitions of
  :mod:`prunerl.envs.tasks` over MuJoCo's C batch API, all envs in one call, bit-identical to
  ``gymnasium``.

Contract (tests/test_engines.py checks it for every engine and task): NumPy in and out;
observations and rewards float64 (Gymnasium's dtypes), flags bool; env ``i`` seeded with
``seeds[i]`` at a reset draws its reset noise from ``gymnasium.utils.seeding.np_random(seeds[i])``
and a reset without a seed continues that env's stream, as ``gym.Env.reset`` does; truncation at
the task's time limit (Gymnasium's ``TimeLimit``). ``state()`` is the same dict for every engine —
per env the mjSTATE_INTEGRATION vector, the RNG state and the step count — so a checkpoint written
with one engine resumes with another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np


class Engine(ABC):
    """``num_envs`` copies of one task. Subclasses set the attributes in ``__init__``."""

    name: str
    env_id: str
    num_envs: int
    obs_dim: int
    action_low: np.ndarray   # float32, the action space's bounds (actuator ctrlrange)
    action_high: np.ndarray

    @abstractmethod
    def reset(self, ids: np.ndarray, seeds: Sequence[int | None]) -> np.ndarray:
        """Start new episodes in envs ``ids`` (``seeds[k]`` for env ``ids[k]``, None: continue its
        RNG); return their observations, ``(len(ids), obs_dim)`` float64."""

    @abstractmethod
    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Apply ``action`` ``(num_envs, act_dim)`` float64 (already within the bounds) to every env;
        return ``(observation, reward, terminated, truncated)``, each with first axis ``num_envs``."""

    @abstractmethod
    def state(self) -> dict:
        """``{"envs": [{"mj_state", "np_random", "elapsed_steps"}, ...]}`` (+ engine extras)."""

    @abstractmethod
    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` of any engine of the same task and size."""

    def close(self) -> None:  # noqa: B027 — optional
        pass
