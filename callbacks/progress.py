"""A progress bar in environment frames: frames done / total, SPS, recent episode return."""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm


class FrameProgressBar(ProgressBar):
    """One bar for the whole run (Lightning's default bar restarts every epoch = every rollout)."""

    def __init__(self):
        super().__init__()
        self._enabled = True
        self.bar: tqdm | None = None
        self._t0 = 0.0
        self._frames0 = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module):
        dm = trainer.datamodule
        total = trainer.max_epochs * dm.frames_per_batch
        self._t0, self._frames0 = time.perf_counter(), dm.frames
        if self._enabled and trainer.is_global_zero:
            self.bar = tqdm(total=total, initial=dm.frames, unit="frame", unit_scale=True,
                            dynamic_ncols=True, file=sys.stderr, desc="fit")

    def on_train_epoch_end(self, trainer, pl_module):
        if self.bar is None:
            return
        dm = trainer.datamodule
        sps = (dm.frames - self._frames0) / max(time.perf_counter() - self._t0, 1e-9)
        self.bar.update(dm.frames - self.bar.n)
        self.bar.set_postfix(sps=f"{sps:.0f}", ret=f"{dm.train_return:.1f}", t=trainer.global_step,
                             refresh=False)

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
