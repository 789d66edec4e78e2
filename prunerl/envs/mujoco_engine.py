"""``env.engine=mujoco``: the Gymnasium v5 task definitions (:mod:`prunerl.envs.tasks`) over MuJoCo's
C batch API — all envs stepped by one call, in C, on ``threads`` threads, with no Python per env
except at resets (each env's own reset-noise RNG). Bit-identical to ``env.engine=gymnasium``
(tests/test_engines.py), because it runs the same MuJoCo calls on the same state:

- a reset is Gymnasium's: ``mj_resetData``, qpos/qvel = initial + noise from the env's
  ``np_random`` (same stream), then ``mj_forward`` — which also sets the solver's warm start;
- an env step sets ``ctrl`` and runs ``frame_skip`` × ``mj_step`` from the full integration state
  (qpos, qvel, act, ``qacc_warmstart``, ...) that the previous call left, as one MjData would;
- Ant: ``mj_rnePostConstraint`` after the steps (``cfrc_ext``), and the torso's ``xpos`` as
  ``mj_step`` leaves it (from the last RK4 stage, not from the new qpos) for its forward reward.
"""

from __future__ import annotations

from typing import Sequence

import mujoco
import numpy as np
from gymnasium.utils.seeding import np_random

from prunerl.envs.engine import Engine
from prunerl.envs.mujoco_batch import STAGE_ACC, STAGE_NONE, STAGE_POS, MjBatch
from prunerl.envs.tasks import DEFINITIONS, Fields


class MujocoEngine(Engine):
    name = "mujoco"

    def __init__(self, env_id: str, num_envs: int, threads: int = 1):
        self.env_id, self.num_envs = env_id, num_envs
        self.task = task = DEFINITIONS[env_id]
        self.model = model = mujoco.MjModel.from_xml_path(task.model_path)
        self.dt = model.opt.timestep * task.frame_skip  # Gymnasium's MujocoEnv.dt
        self.init_qpos = model.qpos0.copy()  # what a fresh MjData holds (MujocoEnv.init_qpos)
        self.init_qvel = np.zeros(model.nv)
        self.action_low, self.action_high = model.actuator_ctrlrange.copy().astype(np.float32).T
        self.batch = MjBatch(model, num_envs, nthread=min(threads, num_envs))
        self.qpos = self.batch.component(mujoco.mjtState.mjSTATE_QPOS)
        self.qvel = self.batch.component(mujoco.mjtState.mjSTATE_QVEL)
        self.ctrl = self.batch.component(mujoco.mjtState.mjSTATE_CTRL)
        shapes = {"xpos": (model.nbody, 3), "cfrc_ext": (model.nbody, 6)}
        self.derived = {name: self.batch.output(name, shapes[name]) for name in task.derived}
        self.obs_dim = task.observation(self.fields()).shape[1]
        self._rngs: list[np.random.Generator | None] = [None] * num_envs
        self._elapsed = np.zeros(num_envs, dtype=np.int64)
        self._position = np.array(task.position(self.fields()))  # before the next step, per env

    def fields(self) -> Fields:
        return Fields(self.qpos, self.qvel, **self.derived)

    def _rng(self, i: int) -> np.random.Generator:
        if self._rngs[i] is None:  # as gym.Env.np_random: seeded from entropy on first use
            self._rngs[i] = np_random()[0]
        return self._rngs[i]

    def reset(self, ids: np.ndarray, seeds: Sequence[int | None]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        self.batch.reset(ids, STAGE_NONE)
        for i, seed in zip(ids.tolist(), seeds):
            if seed is not None:
                self._rngs[i] = np_random(seed)[0]
            self.qpos[i], self.qvel[i] = self.task.reset_state(self._rng(i), self.init_qpos, self.init_qvel)
        self.batch.forward(ids, STAGE_ACC)
        self._elapsed[ids] = 0
        f = self.fields()
        self._position[ids] = self.task.position(f)[ids]
        return self.task.observation(f)[ids]

    def step(self, action: np.ndarray):
        if np.shape(action) != self.ctrl.shape:  # no silent broadcast of one env's action to all
            raise ValueError(f"action has shape {np.shape(action)}; expected {self.ctrl.shape} (num_envs, act_dim)")
        self.ctrl[:] = action
        self.batch.step(self.task.frame_skip)
        if self.task.contact_forces:
            self.batch.rne_post_constraint()
        f = self.fields()
        reward, terminated = self.task.reward_and_termination(f, self._position, action, self.dt)
        self._position[:] = self.task.position(f)
        self._elapsed += 1
        return self.task.observation(f), reward, terminated, self._elapsed >= self.task.max_episode_steps

    def state(self) -> dict:
        envs = [{"mj_state": self.batch.state[i].copy(), "np_random": self._rng(i).bit_generator.state,
                 "elapsed_steps": int(self._elapsed[i])} for i in range(self.num_envs)]
        return {"envs": envs, "position": self._position.copy()}

    def load_state(self, state: dict) -> None:
        for i, s in enumerate(state["envs"]):
            self.batch.state[i] = s["mj_state"]
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = s["np_random"]
            self._rngs[i] = rng
            self._elapsed[i] = s["elapsed_steps"] or 0
        if "position" in state:
            self._position[:] = state["position"]
        else:  # a gymnasium-engine checkpoint: positions from the state (as that engine's own resume)
            self.batch.forward(None, STAGE_POS)
            self._position[:] = self.task.position(self.fields())

    def close(self) -> None:
        # the views hold the batch's C memory (mujoco_batch): drop them so that it is freed now
        self.qpos = self.qvel = self.ctrl = None
        self.derived = {}
        self.batch.close()
