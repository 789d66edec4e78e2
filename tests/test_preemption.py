"""Preemption: a signal finishes the rollout, checkpoints, marks the run interrupted; resuming it
ends with exactly the weights of the run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from prunerl.fit import fit
from prunerl.preemption import EXIT_INTERRUPTED
from prunerl.rundir import read_summary
from tests.conftest import SMALL, compose_cfg

REPO = Path(__file__).resolve().parents[1]
OVER = ("total_frames=4096", "algo.kappa=0.3", "checkpoint.every_n_rollouts=null")


class SignalAt(L.Callback):
    """Sends this process ``signum`` at a chosen moment of a chosen rollout: as its collection
    starts, at an update (the first is the earliest point after collection), while the periodic
    evaluation runs, while a checkpoint is being written (``rollout=-1``: at the first such moment),
    or before training starts (``setup``: the Trainer's setup, after the env and models are built;
    ``train_start``: after Lightning has set up the loop and the data, before ``Preemption`` takes
    the signals again — listed before it, as every ``callbacks.*`` is).

    The signal is sent from a hook, so it arrives at a hook boundary; Python runs a handler between
    bytecodes of the main thread anyway (a signal during a MuJoCo step or a matmul is handled when
    that C call returns), so what differs between moments is the state of the loop, which these cover."""

    def __init__(self, signum: int, rollout: int, update: int = 0, moment: str = "update"):
        self.signum, self.rollout, self.update, self.moment, self.sent = signum, rollout, update, moment, False

    def _send(self, trainer, moment: str) -> None:
        if not self.sent and moment == self.moment and self.rollout in (trainer.current_epoch, -1):
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_start(self, trainer, pl_module):
        self._send(trainer, "train_start")
        if self.moment == "evaluation":   # inside the evaluation callback's evaluate()
            ev = next(c for c in trainer.callbacks if type(c).__name__ == "AdversarialEvaluation")
            inner = ev.evaluate

            def evaluate(trainer, pl_module):
                self._send(trainer, "evaluation")
                return inner(trainer, pl_module)
            ev.evaluate = evaluate

    def setup(self, trainer, pl_module, stage):
        self._send(trainer, "setup")

    def on_train_epoch_start(self, trainer, pl_module):   # the rollout is collected right after
        self._send(trainer, "collection")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.update:
            self._send(trainer, "update")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):   # while the checkpoint is assembled
        self._send(trainer, "checkpoint")


# (signal, rollout, update, moment, extra overrides, rollouts the cut run completes). SIGTERM at every
# moment (Lightning watches it too); SIGUSR2 (submitit's) and SIGINT mid-rollout; SIGUSR1 (SLURM's)
# is sent to the CLI in tests/test_faults.py
MOMENTS = [
    (signal.SIGTERM, 1, 0, "update", (), 2), (signal.SIGUSR2, 1, 7, "update", (), 2),
    (signal.SIGINT, 2, 15, "update", (), 3),
    (signal.SIGTERM, 1, 0, "collection", (), 2),
    # before training: the first rollout is finished
    (signal.SIGTERM, 0, 0, "setup", (), 1), (signal.SIGTERM, 0, 0, "train_start", (), 1),
    (signal.SIGTERM, 1, 0, "evaluation", ("evaluation.every_frames=1024",), 2),
    # the periodic checkpoint is written after the rollout's stop check: the next rollout finishes first
    (signal.SIGTERM, 0, 0, "checkpoint", ("checkpoint.every_n_rollouts=1",), 2),
]
EVAL = ("evaluation.attacks=[random]", "evaluation.episodes=2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of ``OVER`` + ``EVAL`` + extra overrides, run once per extra: (run dir, summary)."""
    runs = {}

    def get(extra: tuple) -> tuple[Path, dict]:
        if extra not in runs:
            run = tmp_path_factory.mktemp("whole") / "run"
            runs[extra] = run, fit(compose_cfg(run, *SMALL, *OVER, *EVAL, *extra))
        return runs[extra]

    return get


@pytest.mark.parametrize("signum, rollout, update, moment, extra, done", MOMENTS,
                         ids=[f"{signal.Signals(m[0]).name}-{m[3]}-r{m[1]}u{m[2]}" for m in MOMENTS])
def test_a_signal_checkpoints_and_the_resumed_run_ends_like_the_uninterrupted_one(small_cfg, tmp_path, uninterrupted,
                                                                                   signum, rollout, update, moment,
                                                                                   extra, done):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    over = (*OVER, *EVAL, *extra)
    whole_dir, whole = uninterrupted(extra)
    assert whole["status"] == "finished"

    cfg = small_cfg(*over, f"+callbacks.signal._target_={__name__}.SignalAt", f"+callbacks.signal.signum={int(signum)}",
                    f"+callbacks.signal.rollout={rollout}", f"+callbacks.signal.update={update}",
                    f"+callbacks.signal.moment={moment}", run_dir=tmp_path / "cut")
    cut = fit(cfg)
    # the rollout in progress was finished (its 16 updates), then the run stopped
    assert cut["status"] == "interrupted" and cut["interrupted_by"] == signal.Signals(signum).name
    assert cut["frames"] == 1024 * done < 4096 and cut["updates"] == 16 * done
    assert cut["clean_return"] is None and read_summary(tmp_path / "cut")["status"] == "interrupted"
    assert {s: signal.getsignal(s) for s in before} == before   # the handlers from before the run, restored

    resumed = fit(small_cfg(*over, f"resume={cut['resume']}", run_dir=tmp_path / "resumed"))
    assert resumed["status"] == "finished" and resumed["frames"] == 4096
    a = torch.load(whole_dir / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert resumed["clean_return"] == whole["clean_return"]


def test_a_signal_during_the_end_of_run_evaluation_lets_it_finish_and_the_run_counts_as_finished(small_cfg, tmp_path):
    s = fit(small_cfg(*OVER, "evaluation.attacks=[random]", "evaluation.episodes=2",
                      f"+callbacks.signal._target_={__name__}.SignalAt", f"+callbacks.signal.signum={int(signal.SIGTERM)}",
                      "+callbacks.signal.rollout=-1", "+callbacks.signal.moment=evaluation", run_dir=tmp_path / "run"))
    assert s["status"] == "finished" and s["signal_received"] == "SIGTERM" and s["clean_return"] is not None


def test_a_preemption_inside_a_periodic_evaluations_adversary_training_checkpoints_and_stops(small_cfg, tmp_path,
                                                                                             monkeypatch):
    """``optimal`` in a periodic evaluation trains learned adversaries by a nested ``fit``, whose own
    handlers take the signal; its ``Interrupted`` must stop the outer run as a preemption does
    (checkpoint, interrupted summary, exit 75), and the resumed run must evaluate there again."""
    import prunerl.evaluate
    from prunerl.preemption import Interrupted

    calls = []

    def preempted(*args, **kwargs):   # a stand-in for the nested fit that took a SIGTERM
        calls.append(args[0])
        raise Interrupted("SIGTERM")

    monkeypatch.setattr(prunerl.evaluate, "learned_adversaries", preempted)
    run = tmp_path / "run"
    s = fit(small_cfg(*OVER, "evaluation.attacks=[optimal]", "evaluation.episodes=2",
                      "evaluation.every_frames=1024", run_dir=run))
    assert len(calls) == 1 and calls[0].name == "eval-f1024.ckpt"
    assert s["status"] == "interrupted" and s["interrupted_by"] == "SIGTERM"
    assert s["frames"] == 1024 and s["updates"] == 16 and s["clean_return"] is None
    assert read_summary(run)["status"] == "interrupted" and s["resume"] == str(run / "checkpoints" / "last.ckpt")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["prunerl"]["frames"] == 1024
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("AdversarialEvaluation"))
    assert state["next_at"] == 1024 and state["history"] == []   # resumed, it evaluates at 1,024 frames


def test_the_handler_records_the_signal_even_when_it_cannot_print(monkeypatch):
    """A print inside a handler raises ("reentrant call inside BufferedWriter") when the signal lands
    while the main thread writes to stdout: the signal must be recorded all the same."""
    from prunerl.preemption import Preemption

    def reentrant(*args, **kwargs):
        raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>")

    monkeypatch.setattr("builtins.print", reentrant)
    p = Preemption()
    p._handler(signal.SIGTERM, None)
    assert p.interrupted == "SIGTERM"


def test_the_cli_exits_75_with_a_resume_line_and_the_report_names_the_interrupted_run(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "prunerl", "fit", "env=inverted_pendulum", "env.num_envs=8", "total_frames=40960",
            "algo.frames_per_batch=1024", "algo.minibatches=8", "algo.epochs=2", "algo.model.hidden=[64,64]",
            "logger=none", "callbacks.progress=null", f"hydra.run.dir={run}"]
    child = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    # wait until training has started (its first metrics row), then preempt
    t0 = time.time()
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert child.poll() is None and time.time() - t0 < 120, child.stdout.read() if child.poll() is not None else ""
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == EXIT_INTERRUPTED, out
    assert "interrupted by SIGTERM" in out and f"resume={run / 'checkpoints' / 'last.ckpt'}" in out
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "interrupted" and s["frames"] < 40960
    torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)

    from prunerl.runset import read_runs
    rs = read_runs(tmp_path)
    assert [why for _, why in rs.problems if "interrupted by SIGTERM" in why and "resume=" in why]
