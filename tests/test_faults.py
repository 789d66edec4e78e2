"""Faults lose nothing: divergence stops at the update with the term named, resume=auto continues a
cut or crashed run in place, time-based checkpoints, the write probe, W&B without a network, the
SLURM requeue."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from prunerl.config import ConfigError
from prunerl.fit import fit
from prunerl.rundir import read_metrics, read_summary

REPO = Path(__file__).resolve().parents[1]
OVER = ("total_frames=4096", "algo.kappa=0.3", "checkpoint.every_n_rollouts=null", "evaluation.attacks=[random]",
        "evaluation.episodes=2")


class InjectNaN(L.Callback):
    """Writes a NaN at update ``update`` into ``where``: a weight (before the update's forward pass),
    or the observation normaliser's mean (before a rollout is collected, or at a rollout's end)."""

    def __init__(self, where: str, update: int):
        self.where, self.update, self.done = where, update, False

    def _due(self, trainer) -> bool:
        return not self.done and trainer.global_step >= self.update

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "weight" and self._due(trainer):
            self.done = True
            with torch.no_grad():
                pl_module.actor.mean_net[2].weight[0, 0] = float("nan")

    def on_train_epoch_start(self, trainer, pl_module):
        if self.where == "normalizer_before_rollout" and self._due(trainer):
            self.done = True
            trainer.datamodule.normalizer.obs_mean[1] = float("inf")

    def on_train_epoch_end(self, trainer, pl_module):
        if self.where == "normalizer_at_rollout_end" and self._due(trainer):
            self.done = True
            trainer.datamodule.normalizer.obs_var[0] = float("nan")


def _nan_cfg(small_cfg, where, update, run_dir, *extra):
    return small_cfg(*OVER, *extra, f"+callbacks.nan._target_={__name__}.InjectNaN", f"+callbacks.nan.where={where}",
                     f"+callbacks.nan.update={update}", run_dir=run_dir)


@pytest.mark.parametrize("where, update, term, at", [
    ("weight", 21, "parameter actor.mean_net.2.weight", 21),            # mid-rollout 2 (16 updates a rollout)
    ("normalizer_before_rollout", 32, "observation normaliser statistic obs_mean", 32),  # at rollout 3's collection
    ("normalizer_at_rollout_end", 17, "observation normaliser statistic obs_var", 32),   # end of rollout 2
])
def test_a_nan_stops_the_run_at_that_update_naming_the_term_and_keeps_a_good_checkpoint(small_cfg, tmp_path, where,
                                                                                       update, term, at):
    run = tmp_path / "run"
    s = fit(_nan_cfg(small_cfg, where, update, run, "checkpoint.every_n_rollouts=1"))
    assert s["status"] == "diverged" and s["diverged_at_update"] == at and s["diverged_term"] == term, s
    assert s["error"] == f"training diverged at update t={at}: {term} is not finite (NaN or Inf)"
    assert read_summary(run)["status"] == "diverged" and s["clean_return"] is None
    # the last good checkpoint: the newest on disk, whole and finite, from before the NaN
    good = torch.load(s["last_good_checkpoint"], weights_only=False)
    assert good["global_step"] == (16 if at < 32 or where == "normalizer_at_rollout_end" else 32)
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    norm = good["RolloutDataModule"]["normalizer"]
    assert all(torch.isfinite(v).all() for v in norm.values())
    assert not [p for p in (run / "checkpoints").glob("*.ckpt")
                if torch.load(p, weights_only=False)["global_step"] > good["global_step"]]
    # no metrics row past the divergence
    assert max(r["step"] for r in read_metrics(run)) < at + 16


def test_a_resumed_run_that_diverges_before_its_own_first_checkpoint_names_the_one_it_resumed_from(small_cfg,
                                                                                                tmp_path):
    first = fit(small_cfg(*OVER, "total_frames=2048", run_dir=tmp_path / "first"))
    src = str(tmp_path / "first" / "checkpoints" / "last.ckpt")
    s = fit(_nan_cfg(small_cfg, "weight", 40, tmp_path / "run", f"resume={src}"))
    assert first["updates"] == 32 and s["status"] == "diverged" and s["diverged_at_update"] == 40
    assert s["last_good_checkpoint"] == src


def test_the_cli_exits_3_with_one_line_and_a_sweep_treats_a_diverged_run_as_done(small_cfg, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "prunerl", "fit", "env=inverted_pendulum", "env.num_envs=8", "total_frames=4096",
            "algo.frames_per_batch=1024", "algo.minibatches=8", "algo.epochs=2", "algo.model.hidden=[64,64]",
            "logger=none", "callbacks.progress=null", "evaluation.attacks=[random]", "evaluation.episodes=2",
            f"+callbacks.nan._target_={__name__}.InjectNaN", "+callbacks.nan.where=weight", "+callbacks.nan.update=5",
            f"hydra.run.dir={run}"]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"})
    assert r.returncode == 3, r.stdout + r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert err == ["error: training diverged at update t=5: parameter actor.mean_net.2.weight is not finite "
                   "(NaN or Inf) — the run stopped there; summary.json says \"diverged\"; last good checkpoint: "
                   "none (it diverged before the first)"], r.stderr
    assert "Traceback" not in r.stderr
    # a sweep (skip_finished / resume=auto) does not retrain it: it would diverge again the same way
    again = fit(_nan_cfg(small_cfg, "weight", 5, run, "resume=auto"))
    assert again.get("skipped") and again["status"] == "diverged"


class SignalAt(L.Callback):
    def __init__(self, update: int):
        self.update, self.sent = update, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.global_step == self.update:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def _same_weights(a_path, b_path):
    a, b = (torch.load(p, weights_only=False) for p in (a_path, b_path))
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_resume_auto_continues_a_preempted_run_in_place_and_ends_like_the_uninterrupted_one(small_cfg, tmp_path):
    whole = fit(small_cfg(*OVER, run_dir=tmp_path / "whole"))
    run = tmp_path / "run"
    sig = (f"+callbacks.sig._target_={__name__}.SignalAt", "+callbacks.sig.update=20")  # part of the run's config
    cut = fit(small_cfg(*OVER, *sig, run_dir=run))
    assert cut["status"] == "interrupted" and cut["frames"] == 2048
    resumed = fit(small_cfg(*OVER, *sig, "resume=auto", run_dir=run))
    assert resumed["status"] == "finished" and resumed["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    _same_weights(tmp_path / "whole" / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    assert resumed["clean_return"] == whole["clean_return"]
    # one metrics row per rollout, as in the uninterrupted run (none repeated)
    steps = [r["step"] for r in read_metrics(run) if "train/update" in r]
    assert steps == [r["step"] for r in read_metrics(tmp_path / "whole") if "train/update" in r]
    # resume=auto on the finished run: skipped, nothing rewritten
    before = (run / "summary.json").read_text()
    assert fit(small_cfg(*OVER, *sig, "resume=auto", run_dir=run)).get("skipped")
    assert (run / "summary.json").read_text() == before
    # resume=auto with another config is refused, naming the difference
    with pytest.raises(ConfigError, match="holds a finished run of another config .*seed: 0 there, 1 now"):
        fit(small_cfg(*OVER, *sig, "resume=auto", "seed=1", run_dir=run))


def test_kill_9_mid_run_loses_only_the_work_since_the_newest_checkpoint(small_cfg, tmp_path):
    """A crash (SIGKILL: no handler runs): resume=auto continues from the newest checkpoint, drops the
    metrics rows logged after it, and ends with the uninterrupted run's weights."""
    over = ("env=inverted_pendulum", "env.num_envs=8", "total_frames=10240", "algo.frames_per_batch=1024",
            "algo.minibatches=8", "algo.epochs=2", "algo.model.hidden=[64,64]", "logger=csv",
            "callbacks.progress=null", "evaluation.attacks=[random]", "evaluation.episodes=2",
            "checkpoint.every_n_rollouts=3", "checkpoint.every_minutes=null")
    whole = fit(small_cfg(*over[8:], *over[:8], run_dir=tmp_path / "whole"))
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "prunerl", "fit", *over, f"hydra.run.dir={run}"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ((run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 4):   # 4 rollouts done
        assert child.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    child.kill()
    child.wait()
    assert not (run / "summary.json").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] in (48, 96, 144)
    lost = [r["step"] for r in read_metrics(run) if r["step"] > ckpt["global_step"]]
    assert lost   # rows of work the crash lost (the resumed run trains it again)
    resumed = fit(small_cfg(*over[8:], *over[:8], "resume=auto", run_dir=run))
    assert resumed["status"] == "finished" and resumed["frames"] == 10240
    _same_weights(tmp_path / "whole" / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    steps = [r["step"] for r in read_metrics(run) if "train/update" in r]
    assert steps == [16 * k for k in range(1, 11)]
    assert resumed["clean_return"] == whole["clean_return"]
    # logger=csv: Lightning's CSVLogger would have deleted csv/metrics.csv; it goes on from the checkpoint
    assert _csv_steps(run) == _csv_steps(tmp_path / "whole") and len(_csv_steps(run)) >= 10
    assert not list((run / "checkpoints").glob("*-v1.ckpt"))   # last.ckpt rewritten, never last-v1.ckpt


def _csv_steps(run):
    import csv

    with (run / "csv" / "metrics.csv").open(newline="") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f)]


def test_resume_run_dir_continues_in_place_or_into_a_new_dir(small_cfg, tmp_path):
    """resume=RUN_DIR: that run dir's newest good checkpoint — in place when it is hydra.run.dir
    (as resume=auto), else into hydra.run.dir (as resume=CHECKPOINT); either ends like the whole run."""
    import shutil

    over = (*OVER, "checkpoint.every_n_rollouts=3")
    whole = fit(small_cfg(*over, run_dir=tmp_path / "whole"))
    run = tmp_path / "run"
    sig = (f"+callbacks.sig._target_={__name__}.SignalAt", "+callbacks.sig.update=20")
    assert fit(small_cfg(*over, *sig, run_dir=run))["status"] == "interrupted"
    shutil.copytree(run, tmp_path / "copy")
    other = fit(small_cfg(*over, *sig, f"resume={tmp_path / 'copy'}", run_dir=tmp_path / "other"))
    assert other["status"] == "finished" and other["resumed_from"] == str(tmp_path / "copy" / "checkpoints" / "last.ckpt")
    _same_weights(tmp_path / "whole" / "checkpoints" / "last.ckpt", tmp_path / "other" / "checkpoints" / "last.ckpt")
    here = fit(small_cfg(*over, *sig, f"resume={run}", run_dir=run))
    assert here["status"] == "finished" and here["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    _same_weights(tmp_path / "whole" / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    assert here["clean_return"] == other["clean_return"] == whole["clean_return"]
    # Lightning's version counter would have written last-v1.ckpt, last-v2.ckpt beside last.ckpt
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "rollout00002-t48.ckpt"]
    with pytest.raises(ConfigError, match=r"resume=.*empty holds no checkpoint to continue from"):
        (tmp_path / "empty").mkdir()
        fit(small_cfg(*over, f"resume={tmp_path / 'empty'}", run_dir=tmp_path / "x"))
    assert not (tmp_path / "x").exists()


class RowAtCheckpoint(L.Callback):
    """At every checkpoint written while training: is the rollout's metrics row already on disk?"""

    def __init__(self):
        self.seen = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        steps = [r["step"] for r in read_metrics(trainer.default_root_dir) if "train/update" in r]
        self.seen.append((trainer.global_step, trainer.global_step in steps))


def test_a_timed_checkpoint_is_written_after_its_rollouts_metrics_row(small_cfg, tmp_path):
    """A kill -9 right after checkpoint.every_minutes writes last.ckpt must not lose the row of the
    update it holds: resume=auto keeps rows up to the checkpoint and never logs that one again."""
    cfg = small_cfg(*OVER, "checkpoint.every_minutes=0.000001", f"+callbacks.row._target_={__name__}.RowAtCheckpoint")
    from prunerl import fit as fit_module

    seen = []
    real = fit_module.L.Trainer.fit

    def keep(trainer, *a, **k):
        out = real(trainer, *a, **k)
        seen.extend(next(c for c in trainer.callbacks if isinstance(c, RowAtCheckpoint)).seen)
        return out

    fit_module.L.Trainer.fit = keep
    try:
        fit(cfg)
    finally:
        fit_module.L.Trainer.fit = real
    assert [t for t, _ in seen][:4] == [16, 32, 48, 64] and all(ok for _, ok in seen), seen


def test_a_logger_that_cannot_be_made_leaves_no_config(small_cfg, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Exception, match="no.such"):
        fit(small_cfg(*OVER, "logger=csv", "logger.csv._target_=no.such.Logger", run_dir=run))
    assert not run.exists() or not any(run.iterdir())


def test_a_requeue_needs_a_run_dir_the_requeued_job_finds_again():
    """The default hydra.run.dir is timestamped: a requeued job would write a new run, so fit does
    not requeue then (it says why); a fixed run dir or a sweep preset's fixed sweep dir is requeued."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import open_dict

    from prunerl.preemption import timestamped_run_dir

    def hydra_cfg(*overrides, mode=RunMode.RUN):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            h = compose("config", overrides=list(overrides), return_hydra_config=True).hydra
        with open_dict(h):
            h.mode = mode
        return h

    assert "hydra.run.dir=outputs/${env.name}/${now:" in timestamped_run_dir(hydra_cfg())
    assert timestamped_run_dir(hydra_cfg("hydra.run.dir=/scratch/run")) is None
    assert "hydra.sweep.dir=multirun/${now:" in timestamped_run_dir(hydra_cfg(mode=RunMode.MULTIRUN))
    assert timestamped_run_dir(hydra_cfg("sweep=methods", mode=RunMode.MULTIRUN)) is None


class CheckpointSeen(L.Callback):
    """Records, as each rollout starts, the update count of the last.ckpt on disk (into ``out``)."""

    def __init__(self, out: str):
        self.out, self.seen = Path(out), []

    def on_train_epoch_start(self, trainer, pl_module):
        p = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        self.seen.append(torch.load(p, weights_only=False)["global_step"] if p.is_file() else None)
        self.out.write_text(json.dumps(self.seen))


@pytest.mark.parametrize("minutes, seen", [("0.000001", [None, 16, 32, 48]), ("null", [None, None, None, None])])
def test_every_minutes_rewrites_last_ckpt_at_rollout_ends(small_cfg, tmp_path, minutes, seen):
    out = tmp_path / "seen.json"
    fit(small_cfg(*OVER, f"checkpoint.every_minutes={minutes}", f"+callbacks.seen._target_={__name__}.CheckpointSeen",
                  f"+callbacks.seen.out={out}"))
    assert json.loads(out.read_text()) == seen


def test_a_run_killed_during_its_end_of_run_evaluation_resumes_and_only_evaluates(small_cfg, tmp_path):
    run = tmp_path / "run"
    whole = fit(small_cfg(*OVER, run_dir=run))
    (run / "summary.json").unlink()   # as if killed during the end-of-run evaluation (last.ckpt is written before it)
    again = fit(small_cfg(*OVER, "resume=auto", run_dir=run))
    assert again["status"] == "finished" and again["updates"] == whole["updates"]
    assert again["clean_return"] == whole["clean_return"] and again["wall_time_s"] < whole["wall_time_s"]
    # resume=PATH from a finished run's last checkpoint: evaluated too (Lightning trains nothing)
    other = fit(small_cfg(*OVER, f"resume={run / 'checkpoints' / 'last.ckpt'}", run_dir=tmp_path / "other"))
    assert other["clean_return"] == whole["clean_return"]


def test_a_run_without_a_good_checkpoint_is_moved_aside_not_lost(small_cfg, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"torn")
    fit(small_cfg(*OVER, "total_frames=1024", run_dir=tmp_path / "ref"))
    (run / "config.yaml").write_text((tmp_path / "ref" / "config.yaml").read_text().replace(
        str(tmp_path / "ref"), str(run)))
    s = fit(small_cfg(*OVER, "total_frames=1024", "resume=auto", run_dir=run))
    assert s["status"] == "finished" and s["resumed_from"] is None
    assert (tmp_path / "run.partial-0" / "checkpoints" / "last.ckpt").read_bytes() == b"torn"


def test_the_write_probe_refuses_an_unwritable_or_full_run_dir_before_anything_is_written(small_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"hydra.run.dir={blocker}/run cannot be created: {blocker} is a file"):
        fit(small_cfg(run_dir=blocker / "run"))
    with pytest.raises(ConfigError, match=r"has [\d,]+ MiB free, less than checkpoint.min_free_mb=1e\+12"):
        fit(small_cfg("checkpoint.min_free_mb=1e12", run_dir=tmp_path / "new" / "run"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]   # no directory left behind
    ro = Path("/proc/self/prunerl-run")   # a filesystem nobody can create files in
    with pytest.raises(ConfigError, match="is not writable|cannot be created"):
        fit(small_cfg(run_dir=ro))


def test_wandb_online_without_a_network_falls_back_to_offline(small_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")   # nothing listens there
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = fit(small_cfg(*OVER, "total_frames=1024", "logger=wandb", run_dir=tmp_path / "run"))
    assert s["status"] == "finished" and time.time() - t0 < 120
    assert any("W&B: cannot reach http://127.0.0.1:9" in str(w.message) for w in caught)
    assert os.environ["WANDB_MODE"] == "offline"
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_a_preempted_slurm_job_is_requeued_and_its_requeued_run_resumes(tmp_path):
    """SLURM itself is not here: a stand-in `scontrol` on PATH records the call fit makes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "prunerl", "fit", "env=inverted_pendulum", "env.num_envs=8", "total_frames=20480",
            "algo.frames_per_batch=1024", "algo.minibatches=8", "algo.epochs=2", "algo.model.hidden=[64,64]",
            "logger=none", "callbacks.progress=null", "evaluation.attacks=[random]", "evaluation.episodes=2",
            "resume=auto", f"hydra.run.dir={run}"]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    child = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    t0 = time.time()
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
        assert child.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    child.send_signal(signal.SIGUSR1)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 75, out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n" and "requeued SLURM job 4242" in out
    # the requeued job runs the same command again: it continues the run in place and finishes
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "resume=auto: continuing" in r.stdout, r.stdout + r.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "finished" and s["frames"] == 20480
