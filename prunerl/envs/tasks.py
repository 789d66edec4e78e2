"""The tasks: PruneRL's registry (``env=...``) and the Gymnasium MuJoCo v5 task definitions, written
once over batched arrays.

A :class:`TaskDefinition` is what Gymnasium's ``*_v5.py`` env adds on top of the physics:
the model file and frame skip, the reset noise, the observation, the reward terms and the
termination; truncation is Gymnasium's ``TimeLimit`` (1,000 steps for all five). Its maths reads
batched MjData fields — the first axis is the env — and uses only operations NumPy and torch share
(``xp`` below is the array's own module), so an engine that keeps its state in torch tensors
(MuJoCo Warp) can use the same definitions. On NumPy float64 arrays the results are bit-identical
to Gymnasium's per-env code (tests/test_engines.py): same operations in the same order — keep
it that way when editing (e.g. ``(a + b) - c`` is not ``a + (b - c)`` in floating point).
Defaults are Gymnasium v5's; PruneRL does not change any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np


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


class Fields(NamedTuple):
    """The batched MjData fields a task reads, each ``(num_envs, ...)``: the state after the step
    (``qpos``, ``qvel``) and, where a task needs them, derived fields as ``mj_step`` leaves them
    (computed before the last substep's integration — with RK4, at its last stage)."""

    qpos: object
    qvel: object
    xpos: object = None      # body positions (nbody, 3)
    cfrc_ext: object = None  # external (contact) forces per body (nbody, 6), from mj_rnePostConstraint


def _xp(x):
    """NumPy for NumPy arrays, torch for tensors: the module whose functions ``x`` takes."""
    if isinstance(x, np.ndarray):
        return np
    import torch

    return torch


def _sum_of_squares(x):
    """Σ x² over each env's row: Gymnasium's ``np.sum(np.square(x))`` per env."""
    xp = _xp(x)
    return xp.square(x).reshape(x.shape[0], -1).sum(-1)


class TaskDefinition:
    """One Gymnasium MuJoCo v5 task over ``num_envs`` envs at once (defaults of the v5 env)."""

    env_id: str
    xml: str                     # Gymnasium's asset file
    frame_skip: int              # mj_step calls per env step
    reset_noise_scale: float
    max_episode_steps = 1000     # gymnasium.envs.registration: TimeLimit of every v5 task here
    #: derived MjData fields the task reads besides qpos/qvel (an engine provides them)
    derived: tuple[str, ...] = ()
    #: whether the task reads cfrc_ext: Gymnasium's MujocoEnv runs mj_rnePostConstraint after the
    #: frame_skip mj_step calls (mj_step itself does not compute it)
    contact_forces = False

    @property
    def model_path(self) -> str:
        import gymnasium.envs.mujoco as gym_mujoco

        return str(Path(gym_mujoco.__file__).parent / "assets" / self.xml)

    # -- reset ------------------------------------------------------------------------------------
    def reset_state(self, rng: np.random.Generator, init_qpos: np.ndarray, init_qvel: np.ndarray):
        """(qpos, qvel) of one env's new episode, drawn from that env's ``np_random`` in
        Gymnasium's order (qpos first). Default: uniform noise on both (Hopper, Walker2d,
        InvertedPendulum)."""
        s = self.reset_noise_scale
        qpos = init_qpos + rng.uniform(low=-s, high=s, size=init_qpos.shape[0])
        qvel = init_qvel + rng.uniform(low=-s, high=s, size=init_qvel.shape[0])
        return qpos, qvel

    # -- step -------------------------------------------------------------------------------------
    def position(self, f: Fields):
        """What the forward reward differentiates over the env step (default: the root's x)."""
        return f.qpos[:, 0]

    def observation(self, f: Fields):
        raise NotImplementedError

    def reward_and_termination(self, f: Fields, before, action, dt: float):
        """(reward, terminated) per env after a step: ``before`` is :meth:`position` before it,
        ``action`` the (clipped) control applied, ``dt`` the env step's duration."""
        raise NotImplementedError


class _Runner(TaskDefinition):
    """Hopper and Walker2d: forward progress + healthy bonus − control cost, ends when unhealthy."""

    forward_reward_weight = 1.0
    ctrl_cost_weight = 1e-3
    healthy_reward = 1.0
    reset_noise_scale = 5e-3
    frame_skip = 4

    def observation(self, f: Fields):
        xp = _xp(f.qpos)
        return xp.concatenate((f.qpos[:, 1:], xp.clip(f.qvel, -10, 10)), axis=1)

    def is_healthy(self, f: Fields):
        raise NotImplementedError

    def reward_and_termination(self, f: Fields, before, action, dt: float):
        x_velocity = (f.qpos[:, 0] - before) / dt
        healthy = self.is_healthy(f)
        rewards = self.forward_reward_weight * x_velocity + healthy * self.healthy_reward
        costs = self.ctrl_cost_weight * _sum_of_squares(action)
        return rewards - costs, ~healthy


class Hopper(_Runner):
    env_id, xml = "Hopper-v5", "hopper.xml"

    def is_healthy(self, f: Fields):
        xp = _xp(f.qpos)
        z, angle = f.qpos[:, 1], f.qpos[:, 2]
        state = xp.concatenate((f.qpos, f.qvel), axis=1)[:, 2:]
        healthy_state = ((-100.0 < state) & (state < 100.0)).all(-1)
        return healthy_state & (0.7 < z) & (z < float("inf")) & (-0.2 < angle) & (angle < 0.2)


class Walker2d(_Runner):
    env_id, xml = "Walker2d-v5", "walker2d_v5.xml"

    def is_healthy(self, f: Fields):
        z, angle = f.qpos[:, 1], f.qpos[:, 2]
        return (0.8 < z) & (z < 2.0) & (-1.0 < angle) & (angle < 1.0)


class HalfCheetah(TaskDefinition):
    """Forward progress − control cost; never terminates (only the time limit ends an episode)."""

    env_id, xml, frame_skip = "HalfCheetah-v5", "half_cheetah.xml", 5
    forward_reward_weight = 1.0
    ctrl_cost_weight = 0.1
    reset_noise_scale = 0.1

    def reset_state(self, rng, init_qpos, init_qvel):
        s = self.reset_noise_scale
        qpos = init_qpos + rng.uniform(low=-s, high=s, size=init_qpos.shape[0])
        qvel = init_qvel + s * rng.standard_normal(init_qvel.shape[0])
        return qpos, qvel

    def observation(self, f: Fields):
        return _xp(f.qpos).concatenate((f.qpos[:, 1:], f.qvel), axis=1)

    def reward_and_termination(self, f: Fields, before, action, dt: float):
        x_velocity = (f.qpos[:, 0] - before) / dt
        reward = self.forward_reward_weight * x_velocity - self.ctrl_cost_weight * _sum_of_squares(action)
        return reward, _xp(reward).zeros_like(reward, dtype=bool)


class Ant(TaskDefinition):
    """Forward progress of the torso + healthy bonus − control cost − contact cost; the observation
    ends with the clipped external (contact) forces of every body but the world."""

    env_id, xml, frame_skip = "Ant-v5", "ant.xml", 5
    forward_reward_weight = 1.0
    ctrl_cost_weight = 0.5
    contact_cost_weight = 5e-4
    healthy_reward = 1.0
    healthy_z_range = (0.2, 1.0)
    contact_force_range = (-1.0, 1.0)
    reset_noise_scale = 0.1
    main_body = 1  # the torso
    derived = ("xpos", "cfrc_ext")
    contact_forces = True

    def reset_state(self, rng, init_qpos, init_qvel):
        s = self.reset_noise_scale
        qpos = init_qpos + rng.uniform(low=-s, high=s, size=init_qpos.shape[0])
        qvel = init_qvel + s * rng.standard_normal(init_qvel.shape[0])
        return qpos, qvel

    def position(self, f: Fields):
        # the torso's xpos as mj_step left it (Gymnasium reads data.body(1).xpos), not qpos
        return f.xpos[:, self.main_body, :2]

    def contact_forces_clipped(self, f: Fields):
        return _xp(f.cfrc_ext).clip(f.cfrc_ext, *self.contact_force_range)

    def observation(self, f: Fields):
        xp = _xp(f.qpos)
        forces = self.contact_forces_clipped(f)[:, 1:].reshape(f.qpos.shape[0], -1)
        return xp.concatenate((f.qpos[:, 2:], f.qvel, forces), axis=1)

    def reward_and_termination(self, f: Fields, before, action, dt: float):
        xp = _xp(f.qpos)
        x_velocity = ((self.position(f) - before) / dt)[:, 0]
        z = f.qpos[:, 2]
        state = xp.concatenate((f.qpos, f.qvel), axis=1)
        lo, hi = self.healthy_z_range
        healthy = xp.isfinite(state).all(-1) & (lo <= z) & (z <= hi)
        rewards = x_velocity * self.forward_reward_weight + healthy * self.healthy_reward
        ctrl_cost = self.ctrl_cost_weight * _sum_of_squares(action)
        contact_cost = self.contact_cost_weight * _sum_of_squares(self.contact_forces_clipped(f))
        return rewards - (ctrl_cost + contact_cost), ~healthy


class InvertedPendulum(TaskDefinition):
    """+1 per step while the pole stays within 0.2 rad of upright."""

    env_id, xml, frame_skip = "InvertedPendulum-v5", "inverted_pendulum.xml", 2
    reset_noise_scale = 0.01

    def observation(self, f: Fields):
        return _xp(f.qpos).concatenate((f.qpos, f.qvel), axis=1)

    def reward_and_termination(self, f: Fields, before, action, dt: float):
        obs = self.observation(f)
        terminated = ~_xp(obs).isfinite(obs).all(-1) | (abs(obs[:, 1]) > 0.2)
        return (~terminated) * 1.0, terminated


#: Gymnasium id → its batched definition
DEFINITIONS: dict[str, TaskDefinition] = {
    d.env_id: d for d in (Hopper(), Walker2d(), HalfCheetah(), Ant(), InvertedPendulum())
}
assert set(DEFINITIONS) == ENV_IDS
