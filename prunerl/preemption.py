"""Preemption: SIGTERM, SIGINT and SIGUSR1 (what SLURM sends with ``--signal``) stop a run cleanly.

On the signal the run finishes the rollout in progress (its collection and its updates: about a
second or two for the default recipe), then stops; ``fit`` writes ``checkpoints/last.ckpt`` (the
exact-resume checkpoint of a rollout boundary), writes ``summary.json`` with ``"status":
"interrupted"`` and no evaluation, and the command exits with :data:`EXIT_INTERRUPTED`.
``python -m prunerl fit resume=<run>/checkpoints/last.ckpt [same overrides]`` continues it, ending
with exactly the weights of the run that was never interrupted (tests/test_preemption.py).

A second SIGINT (Ctrl-C twice) stops at once, as Ctrl-C usually does. Lightning's own SIGTERM
handling (raise mid-rollout, no checkpoint) is replaced while the run trains and restored after.
"""

from __future__ import annotations

import signal
import threading

import lightning as L

#: ``fit``'s exit status after a preemption (sysexits' EX_TEMPFAIL: "try again later" — resume).
EXIT_INTERRUPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preemption(L.Callback):
    """Stops the run at the end of the current rollout when a preemption signal arrives."""

    def __init__(self) -> None:
        self.interrupted: str | None = None   # the signal's name, once one arrived
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.interrupted is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # the second Ctrl-C: stop now
        if self.interrupted is None:
            print(f"\nreceived {name}: finishing this rollout, then writing a checkpoint and stopping", flush=True)
        self.interrupted = self.interrupted or name

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning has registered its own handlers (trainer._run), so ours win; signal
        # handlers can only be set from the main thread (a run in a worker thread keeps Lightning's)
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
