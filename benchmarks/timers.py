"""Steady-state timers: both sides time the same window, the whole training loop (collection and
updates) from the end of the first (warm-up) rollout's updates to the end of training.

- :class:`SteadyStateTimer` is a Lightning callback; ``fit`` instantiates it from the config
  (``+callbacks.bench_timer._target_=benchmarks.timers.SteadyStateTimer``) and merges its
  :meth:`summary` into ``summary.json``.
- :func:`sb3_timer` returns an SB3 callback that starts its clock when SB3 starts its second
  rollout (i.e. right after the first rollout's ``train()``).
"""

from __future__ import annotations

import time

import lightning as L


class SteadyStateTimer(L.Callback):
    def __init__(self, warmup_rollouts: int = 1):
        self.warmup_rollouts = warmup_rollouts
        self.t0 = self.t1 = None
        self.frames0 = self.frames1 = None
        self.collect0 = self.collect1 = None
        self.cpu0 = self.cpu1 = None

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.warmup_rollouts - 1:
            dm = trainer.datamodule
            self.frames0, self.collect0 = dm.frames, dm.collect_time
            self.t0 = time.perf_counter()
            self.cpu0 = time.process_time()

    def on_train_end(self, trainer, pl_module):
        self.t1 = time.perf_counter()
        self.cpu1 = time.process_time()
        dm = trainer.datamodule
        self.frames1, self.collect1 = dm.frames, dm.collect_time

    def summary(self, trainer, pl_module) -> dict:
        if self.t0 is None or self.t1 is None:
            return {"bench": None}
        wall = self.t1 - self.t0
        frames = self.frames1 - self.frames0
        collect = self.collect1 - self.collect0
        updates = frames // trainer.datamodule.frames_per_batch * trainer.datamodule.updates_per_rollout
        cpu = self.cpu1 - self.cpu0
        return {"bench": {"frames": frames, "wall_s": wall, "sps": frames / wall, "collect_s": collect,
                          "cpu_s": cpu, "cpu_sps": frames / cpu,
                          "collect_sps": frames / collect if collect else None,
                          "update_s": wall - collect, "updates": updates,
                          "ms_per_update": 1e3 * (wall - collect) / updates if updates else None}}


def sb3_timer(warmup_rollouts: int = 1):
    from stable_baselines3.common.callbacks import BaseCallback

    class SB3SteadyStateTimer(BaseCallback):
        def __init__(self):
            super().__init__()
            self.rollouts = 0
            self.t0 = None
            self.cpu0 = None
            self.frames0 = None
            self.collect_s = 0.0
            self._rollout_t = None

        def _on_rollout_start(self) -> None:
            self.rollouts += 1
            if self.rollouts == warmup_rollouts + 1:
                self.t0 = time.perf_counter()
                self.cpu0 = time.process_time()
                self.frames0 = self.num_timesteps
            self._rollout_t = time.perf_counter()

        def _on_rollout_end(self) -> None:
            if self.t0 is not None:
                self.collect_s += time.perf_counter() - self._rollout_t

        def _on_step(self) -> bool:
            return True

    return SB3SteadyStateTimer()
