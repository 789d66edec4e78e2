"""Preemption: SIGTERM, SIGINT, SIGUSR1 (what SLURM sends with ``--signal``) and SIGUSR2 (what
submitit, Hydra's SLURM launcher, sends) stop a run cleanly.

On the signal the run finishes the rollout in progress (its collection and its updates: about a
second or two for the default recipe), then stops; ``fit`` writes ``checkpoints/last.ckpt`` (the
exact-resume checkpoint of a rollout boundary), writes ``summary.json`` with ``"status":
"interrupted"`` and no evaluation, and the command exits with :data:`EXIT_INTERRUPTED`.
``python -m prunerl fit resume=<run>/checkpoints/last.ckpt [same overrides]`` continues it, ending
with exactly the weights of the run that was never interrupted (tests/test_preemption.py).

A second SIGINT (Ctrl-C twice) stops at once, as Ctrl-C usually does. The handlers are set as soon
as ``fit`` holds its run dir (:meth:`Preemption.arm`: a signal while the env and models are built
stops the run after its first rollout) and again when training starts; ``fit`` restores the previous
handlers when it returns (:meth:`Preemption.disarm`). Lightning's own SIGTERM handler is never
registered (:meth:`Preemption.setup`): its flag makes the loop raise ``SIGTERMException``, a
``SystemExit`` that ends the process with status 0, no checkpoint and no summary. Lightning's SLURM
auto-requeue is off too (``fit`` gives the Trainer ``SLURMEnvironment(auto_requeue=False)``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

#: ``fit``'s exit status after a preemption (sysexits' EX_TEMPFAIL: "try again later" — resume).
EXIT_INTERRUPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Preemption(L.Callback):
    """Stops the run at the end of the current rollout when a preemption signal arrives."""

    def __init__(self) -> None:
        self.interrupted: str | None = None   # the signal's name, once one arrived
        self._previous: dict = {}   # the handlers as training started (restored when it ends)
        self._outer: dict = {}      # the handlers before fit (restored by disarm)

    def arm(self) -> None:
        """Catch the signals from now on (main thread only: elsewhere Python cannot set handlers)."""
        if threading.current_thread() is threading.main_thread():
            self._outer = {s: signal.getsignal(s) for s in SIGNALS}
            for s in SIGNALS:
                signal.signal(s, self._handler)

    def disarm(self) -> None:
        """Give the signals back to whoever had them before :meth:`arm`."""
        for s, h in self._outer.items():
            signal.signal(s, h)
        self._outer = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.interrupted is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # the second Ctrl-C: stop now
        first = self.interrupted is None
        self.interrupted = self.interrupted or name   # first: the message below may fail
        if first:
            try:   # a print inside a handler raises if the signal came while the main thread was printing
                print(f"\nreceived {name}: finishing this rollout, then writing a checkpoint and stopping", flush=True)
            except (RuntimeError, OSError, ValueError):
                pass

    def setup(self, trainer, pl_module, stage) -> None:
        # before trainer._run registers Lightning's SIGTERM handler: keep it from doing so. That
        # handler sets trainer.received_sigterm, and the training loop then raises SIGTERMException
        # (a SystemExit: exit 0, no checkpoint, no summary) for a SIGTERM between its registration
        # and on_train_start below; with it gone, ours (set by arm) catch every signal of that window
        trainer._signal_connector.register_signal_handlers = lambda: None

    def on_train_start(self, trainer, pl_module) -> None:
        # whichever way Lightning's flag got set, the signal is ours: record it, and the loop must not raise
        connector = trainer._signal_connector
        if connector.received_sigterm:
            connector.received_sigterm = False
            self.interrupted = self.interrupted or "SIGTERM"
        # take the signals again (a callback may have set handlers); only the main thread can
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._handler)

    def on_train_epoch_end(self, trainer, pl_module) -> None:   # a rollout's updates are done
        if self.interrupted is not None:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


class TimedCheckpoint(Checkpoint):
    """``checkpoint.every_minutes``: write ``checkpoints/last.ckpt`` at the first rollout end after
    each ``minutes`` of training, so a crash (``kill -9``, a dead node) loses at most about that much.
    Rollout ends only: a checkpoint there resumes exactly (mid-rollout ones could not — the
    rollout's data is not in it). A :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning
    runs it after the module has logged the rollout's metrics row (and after
    :class:`~prunerl.divergence.DivergenceGuard`): a crash right after it loses no row."""

    def __init__(self, minutes: float, path) -> None:
        self.seconds, self.path = 60.0 * float(minutes), path
        self._last = None
        self.saved = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if time.monotonic() - self._last >= self.seconds:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._last = time.monotonic()
            self.saved += 1


def requeue_on_slurm(cfg) -> bool:
    """After a preemption inside a SLURM job (``SLURM_JOB_ID`` set) with ``checkpoint.requeue=auto``:
    put the job back in the queue (``scontrol requeue``, as Lightning's SLURM plugin does). The
    requeued job runs the same command again; with ``resume=auto`` (a sweep's ``skip_finished``)
    it continues this run dir in place. Returns whether a requeue was asked for."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None or cfg.checkpoint.get("requeue", "auto") != "auto":
        return False
    if cfg.resume != "auto" and not cfg.get("skip_finished"):
        print("not requeued: the requeued job would start a new run (run it with resume=auto, or a sweep "
              "preset's skip_finished=true, to be requeued and continued)", flush=True)
        return False
    from hydra.core.hydra_config import HydraConfig

    why = timestamped_run_dir(HydraConfig.get()) if HydraConfig.initialized() else None
    if why is not None:
        print(f"not requeued: {why}; the requeued job would start a new run there instead of continuing "
              "this one — give a fixed hydra.run.dir=DIR (sweeps: hydra.sweep.dir=DIR) to be requeued", flush=True)
        return False
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"warning: could not requeue SLURM job {job}: {e}", flush=True)
        return False
    if r.returncode != 0:
        print(f"warning: `scontrol requeue {job}` failed ({r.returncode}): {r.stderr.strip()}", flush=True)
        return False
    print(f"requeued SLURM job {job}; it resumes from the checkpoint when it starts again "
          f"(with resume=auto or skip_finished=true)", flush=True)
    return True


def timestamped_run_dir(hydra_cfg) -> str | None:
    """Why a rerun of this command would not write to this run dir (its pattern holds ``${now:...}``,
    as the default ``hydra.run.dir`` does), or None when it would."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if hydra_cfg.mode == RunMode.MULTIRUN:
        keys = ("sweep.dir", "sweep.subdir")
    else:
        keys = ("run.dir",)
    for key in keys:
        raw = str(OmegaConf.to_container(hydra_cfg, resolve=False)[key.split(".")[0]][key.split(".")[1]])
        if "${now:" in raw:
            return f"hydra.{key}={raw} is timestamped"
    return None


class Interrupted(Exception):
    """A preemption signal stopped work that cannot finish its part (e.g. an evaluation whose
    learned adversary's own training was preempted); the message is the signal's name."""


class FinalCheckpoint(L.Callback):
    """Writes ``checkpoints/last.ckpt`` when training ends, before the end-of-run evaluation (put
    first in the callback list): a run killed during that evaluation resumes with ``resume=auto``
    and only evaluates (Robust Sarsa's and the adversaries' finished training is cached)."""

    def __init__(self, path) -> None:
        self.path, self.saved = path, False

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved = True
