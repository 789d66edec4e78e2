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

REPO = Path(__file__).resolve().parents[1]
OVER = ("total_frames=4096", "algo.kappa=0.3", "checkpoint.every_n_rollouts=null")


class SignalAt(L.Callback):
    """Sends this process ``signum`` at a chosen moment of a chosen rollout: while collecting it
    (its first update, the earliest point after collection), mid-update, or at its last update."""

    def __init__(self, signum: int, rollout: int, update: int):
        self.signum, self.rollout, self.update, self.sent = signum, rollout, update, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.current_epoch == self.rollout and batch_idx == self.update:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum, rollout, update", [
    (signal.SIGTERM, 1, 0), (signal.SIGUSR1, 1, 7), (signal.SIGINT, 2, 15),
])
def test_a_signal_checkpoints_and_the_resumed_run_ends_like_the_uninterrupted_one(small_cfg, tmp_path, signum,
                                                                                   rollout, update):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    whole = fit(small_cfg(*OVER, run_dir=tmp_path / "whole"))
    assert whole["status"] == "finished"

    cfg = small_cfg(*OVER, f"+callbacks.signal._target_={__name__}.SignalAt", f"+callbacks.signal.signum={int(signum)}",
                    f"+callbacks.signal.rollout={rollout}", f"+callbacks.signal.update={update}",
                    run_dir=tmp_path / "cut")
    cut = fit(cfg)
    # the rollout in progress was finished (its 16 updates), then the run stopped
    assert cut["status"] == "interrupted" and cut["interrupted_by"] == signal.Signals(signum).name
    assert cut["frames"] == 1024 * (rollout + 1) < 4096 and cut["updates"] == 16 * (rollout + 1)
    assert cut["clean_return"] is None and read_summary(tmp_path / "cut")["status"] == "interrupted"
    assert {s: signal.getsignal(s) for s in before} == before   # the handlers from before the run, restored

    resumed = fit(small_cfg(*OVER, f"resume={cut['resume']}", run_dir=tmp_path / "resumed"))
    assert resumed["status"] == "finished" and resumed["frames"] == 4096
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert resumed["clean_return"] == whole["clean_return"]


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
