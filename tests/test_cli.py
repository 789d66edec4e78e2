"""The command line as a user runs it: help, fit, multirun, evaluate, loggers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunerl.fit import fit
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "prunerl", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, **(env or {})})


def test_help_lists_commands_and_groups():
    r = cli("--help")
    assert r.returncode == 0
    for word in ("fit", "evaluate", "env", "algo", "logger", "trainer", "callbacks", "experiment",
                 "inverted_pendulum", "wandb"):
        assert word in r.stdout


@pytest.mark.parametrize("command", ["fit", "evaluate", "report", "export"])
def test_a_commands_help_names_prunerl(command):
    # Hydra names the app after the task function's module; a functools.partial once made it "functools"
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("prunerl is powered by Hydra."), r.stdout[:80]


def test_fit_then_evaluate_round_trip(tmp_path):
    run = tmp_path / "run"
    r = cli("fit", *SMALL, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    # fit prints what it found: the returns (clean, per attack, worst), sparsity, L̃, bound, run dir
    summary = json.loads((run / "summary.json").read_text())
    out = r.stdout[r.stdout.index("done: InvertedPendulum-v5"):]
    assert "2,048 frames" in out and str(run) in out
    lines = {ln.split()[0]: ln for ln in out.splitlines()[1:] if ln.strip()}
    for name, value in [("clean", summary["clean_return"]), *summary["attack_returns"].items()]:
        assert lines[name].split()[1] == f"{value:,.0f}", (name, lines[name])
    worst = min(summary["attack_returns"].values())
    assert lines["robust"].split()[2] == f"{worst:,.0f}"
    assert f"sparsity {summary['sparsity']['global']:.2f}" in out
    assert f"L̃ actor {summary['lipschitz_surrogate']:.3g}" in out
    ckpt = run / "checkpoints" / "last.ckpt"
    r = cli("evaluate", f"checkpoint={ckpt}", "episodes=4", "deterministic=false")
    assert r.returncode == 0, r.stderr
    out = json.loads((run / "checkpoints" / "last.eval.json").read_text())
    assert out["env"] == "inverted_pendulum" and out["frames_trained"] == 2048
    assert out["clean"]["episodes"] == 4 and len(out["clean"]["returns"]) == 4
    assert out["clean"]["deterministic"] is False
    assert "clean return" in r.stdout


def test_multirun_sweeps_into_separate_run_dirs(tmp_path):
    r = cli("fit", "-m", *SMALL, "total_frames=1024", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == 2
    seeds = sorted(json.loads((p / "summary.json").read_text())["seed"] for p in runs)
    assert seeds == [0, 1]


@pytest.mark.parametrize("logger, produced", [("csv", "csv/metrics.csv"), ("tensorboard", "tensorboard"),
                                              ("wandb", "wandb")])
def test_loggers_write_into_the_run_dir(small_cfg, tmp_path, monkeypatch, logger, produced):
    # no key and no WANDB_MODE: fit must choose offline mode by itself
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    fit(small_cfg(f"logger={logger}", "total_frames=1024"))
    assert (tmp_path / "run" / produced).exists()
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    if logger == "wandb":
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_format_summary_names_the_worst_attack_and_the_average():
    from prunerl.rundir import format_summary

    out = format_summary({"env_id": "Hopper-v5", "kappa": 0.3, "seed": 0, "frames": 1000, "wall_time_s": 10.0,
                          "sps": 100.0, "train_return": 900.0, "clean_return": 1000.0,
                          "attack_returns": {"random": 950.0, "rs": 300.0, "mad": 700.0},
                          "evaluation": {"episodes": 50, "deterministic": True, "eps": 0.075},
                          "sparsity": {"global": 0.5, "actor": 0.5, "critic": 0.5}, "pruning_method": "magnitude",
                          "lipschitz_surrogate": 12.5, "certified_bound": 3.1e5, "certified_bound_ball": "linf",
                          "certified_bound_eps": 0.075, "eps": 0.2}, "RUN")  # eps: the SA ball's (algo.sa.eps)
    robust = next(ln for ln in out.splitlines() if "robust (worst)" in ln)
    assert robust.split()[2] == "300" and "(rs)" in robust and "average over attacks 650" in robust
    assert "50 episodes, a = μ(ŝ)" in out and "ℓ∞ ball, ε = 0.075" in out and out.endswith("-> RUN")


def test_a_parallel_sweep_launches_through_joblib(tmp_path):
    """The local launcher pickles the task function: the CLI's must be picklable (a regression)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "prunerl", "fit", "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2",
                        "seed=0,1", "env=inverted_pendulum", "env.num_envs=8", "total_frames=1024",
                        "algo.frames_per_batch=1024", "algo.minibatches=8", "algo.epochs=1", "algo.model.hidden=[32,32]",
                        "logger=none", "callbacks.progress=null", "evaluation.attacks=[random]", "evaluation.episodes=1",
                        f"hydra.sweep.dir={tmp_path}"], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(list(tmp_path.glob("*/summary.json"))) == 2
