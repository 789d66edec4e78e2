"""Environments: the Gymnasium MuJoCo v5 tasks as one batched TorchRL env, on a choice of physics
engine (``env.engine``), plus observation/reward normalisation.

| module | holds |
| --- | --- |
| :mod:`~prunerl.envs.tasks` | the task registry (``env=...``) and the v5 task definitions (observation, reward, termination, reset noise, frame skip), written once over batched arrays |
| :mod:`~prunerl.envs.engine` | the engine interface |
| :mod:`~prunerl.envs.gymnasium_engine` | ``gymnasium``: Gymnasium envs in a loop — the reference |
| :mod:`~prunerl.envs.mujoco_engine` | ``mujoco``: the task definitions over MuJoCo's C batch API (:mod:`~prunerl.envs.mujoco_batch`) — the default |
| :mod:`~prunerl.envs.vec_env` | :class:`MujocoVecEnv` (TorchRL) over an engine, :func:`make_env` |
| :mod:`~prunerl.envs.normalizer` | :class:`RunningNormalizer` |
"""

from prunerl.envs.normalizer import RunningNormalizer, normalizer_of
from prunerl.envs.tasks import ENV_IDS, TASKS, Task
from prunerl.envs.vec_env import DEFAULT_ENGINE, ENGINES, MujocoVecEnv, batched_done_spec, make_engine, make_env

__all__ = ["DEFAULT_ENGINE", "ENGINES", "ENV_IDS", "TASKS", "MujocoVecEnv", "RunningNormalizer", "Task",
           "batched_done_spec", "make_engine", "make_env", "normalizer_of"]
