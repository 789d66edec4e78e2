"""Learning: PruneRL PPO (κ = 0, no pruning) vs Stable-Baselines3 PPO, same frames, per task.

Two recipes (``--recipe``):

- ``default`` (issue 10; the default): PruneRL's own default recipe (``conf/``: 256x256 tanh,
  the CPU default's σ, epochs, minibatches and lr; κ = 0, ``pruning=none``) against SB3's PPO at
  its defaults (64x64 tanh, 2048 steps, 10 epochs, minibatch 64, lr 3e-4, grad clip 0.5) with
  ``VecNormalize`` (what rl-zoo uses for MuJoCo), on ``--tasks`` (default Hopper, Walker2d,
  HalfCheetah, Ant) at ``--frames`` (default 500k). Results: ``results/learning_tasks.json`` and
  a plot of the training curves, ``results/learning_tasks.png``.
- ``sb3``: both sides at SB3's recipe (benchmarks/_common.py: 2048 frames/rollout, 10 epochs,
  minibatch 64, 64x64 tanh actor and critic, learned log-std starting at 0, entropy coefficient
  0, lr 3e-4, γ 0.99, GAE λ 0.95, clip 0.2, value coefficient 0.5, gradient-norm clip 0.5):
  the same learner, two implementations (``results/learning.json``, Hopper, 1M frames).

Observations are normalised (running mean/std, clipped ±10) and rewards scaled by the running std
of the discounted return on both sides: PruneRL always does this, and SB3 gets the same through
its ``VecNormalize`` (``--sb3-no-normalize`` runs SB3 without it).

Figure per run: the mean raw (unscaled) return of the last 20 *training* episodes (stochastic
policy), as SB3 and PruneRL both report during training. Target: PruneRL's median over seeds
≥ SB3's median.

Runs go at most ``--parallel`` at a time (one torch thread each). Every finished run writes
``<runs-dir>/<task>_<side>_s<seed>.json`` (with its curve: frames and the mean return of the last
20 training episodes at every rollout) and the summary JSON is rewritten; a rerun skips runs whose
file exists (so an interrupted benchmark resumes where it stopped).

    python benchmarks/learning.py [--recipe default] [--tasks hopper walker2d halfcheetah ant]
                                  [--frames 500000] [--seeds 0 1 2] [--parallel 2]
    python benchmarks/learning.py --recipe sb3 --tasks hopper --frames 1000000 --out benchmarks/results/learning.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (FRAMES_PER_BATCH, REPO, compose_prunerl, ensure_sb3, machine_info,  # noqa: E402
                                prunerl_overrides, sb3_ppo, single_thread_env, write_json)

LAST_EPISODES = 20
EVAL_EPISODES = 20   # deterministic evaluation of the final policy, both sides (a = μ(s))
GYM_IDS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5", "ant": "Ant-v5"}


def default_recipe_overrides(task: str, frames: int, seed: int, run_dir: str) -> list[str]:
    """PruneRL's default recipe (whatever conf/ says) as plain PPO: κ = 0, no pruning, no
    Lipschitz tracking or attack evaluation (SB3 has none), one torch thread."""
    return [f"env={task}", "algo.kappa=0", "pruning=none", "callbacks.pruning=null", "callbacks.lipschitz=null",
            "callbacks.evaluation=null", "callbacks.progress=null", "logger=none", "torch_threads=1",
            "device=cpu", f"total_frames={frames}", f"seed={seed}", f"run_dir={run_dir}", "skip_finished=true"]


# -- workers ---------------------------------------------------------------------------------------
def _worker_prunerl(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from prunerl.fit import fit

    from prunerl.rundir import read_metrics

    run_dir = Path(args.runs_dir) / f"{args.task}_prunerl_s{args.seed}_run"
    if args.recipe == "sb3":
        cfg = compose_prunerl(prunerl_overrides(kappa=0.0, num_envs=args.num_envs, total_frames=args.frames,
                                                seed=args.seed, run_dir=str(run_dir),
                                                extra=["algo.adam_eps=1e-8", f"env={args.task}"]))
    else:
        cfg = compose_prunerl(default_recipe_overrides(args.task, args.frames, args.seed, str(run_dir)))
    summary = fit(cfg)  # skip_finished: a finished run (an earlier invocation) is read, not re-trained
    curve = [(r["train/frames"], r["train/episode_return"]) for r in read_metrics(run_dir)
             if "train/frames" in r and r.get("train/episode_return") is not None]
    return {"final_return": summary["train_return"], "frames": summary["frames"],
            "episodes": summary["episodes"], "wall_time_s": summary["wall_time_s"], "sps": summary["sps"],
            "run_dir": str(run_dir), "num_envs": cfg.env.num_envs, "curve": curve,
            "algo": _algo(cfg),
            "eval_return": _prunerl_eval(run_dir / "checkpoints" / "last.ckpt", args.task)}


def _algo(cfg) -> dict:
    """The resolved ``algo`` config a PruneRL run trained with: a finished run is reused only while
    the recipe it ran is still the one asked for."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.algo, resolve=True)


def _same_recipe(recorded: dict, now: dict) -> bool:
    """Whether a recorded run's ``algo`` is today's recipe. At κ = 0 the SA settings (``algo.sa``)
    change nothing (the inner loop is skipped), so they are not compared there."""
    def effective(algo: dict) -> dict:
        return {k: v for k, v in algo.items() if not (k == "sa" and algo.get("kappa", 0) == 0)}
    return effective(recorded) == effective(now)


def _recipe_algo(args, task: str) -> dict:
    """The ``algo`` config that the PruneRL worker would compose for ``task`` now."""
    overrides = (prunerl_overrides(kappa=0.0, num_envs=args.num_envs, total_frames=args.frames, seed=0,
                                   run_dir="unused", extra=["algo.adam_eps=1e-8", f"env={task}"])
                 if args.recipe == "sb3" else default_recipe_overrides(task, args.frames, 0, "unused"))
    return _algo(compose_prunerl(overrides))


def _prunerl_eval(ckpt: Path, task: str) -> float:
    """Mean raw return of EVAL_EPISODES deterministic episodes of the final policy (frozen normaliser)."""
    from prunerl.checkpoint import actor_from_checkpoint, load_checkpoint
    from prunerl.evaluation import run_episodes

    actor, norm_state, _ = actor_from_checkpoint(load_checkpoint(ckpt))
    return run_episodes(actor, norm_state, task, EVAL_EPISODES, deterministic=True, seed=12345)["mean_return"]


def _worker_sb3(args) -> dict:
    import gymnasium as gym
    import numpy as np
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    class Curve(BaseCallback):
        def __init__(self):
            super().__init__()
            self.points = []

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            eps = [ep["r"] for ep in self.model.ep_info_buffer][-LAST_EPISODES:]
            if eps:
                self.points.append((self.model.num_timesteps, float(np.mean(eps))))

    torch.set_num_threads(1)
    env = DummyVecEnv([lambda: Monitor(gym.make(GYM_IDS[args.task]))])
    if not args.sb3_no_normalize:
        env = VecNormalize(env, norm_obs=True, norm_reward=True, clip_obs=10.0, gamma=0.99)
    # sb3 recipe: SB3's defaults spelled out (_common.py); default recipe: PPO("MlpPolicy") as is
    model = (sb3_ppo(env, seed=args.seed) if args.recipe == "sb3"
             else PPO("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0))
    curve = Curve()
    t0 = time.perf_counter()
    model.learn(args.frames, callback=curve)
    wall = time.perf_counter() - t0
    returns = [ep["r"] for ep in model.ep_info_buffer][-LAST_EPISODES:]
    # the final policy, deterministic, with the training normaliser frozen (as PruneRL's evaluation)
    eval_env = DummyVecEnv([lambda: Monitor(gym.make(GYM_IDS[args.task]))])
    if not args.sb3_no_normalize:
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False, clip_obs=10.0)
        eval_env.obs_rms = env.obs_rms
    eval_env.seed(12345)
    obs, finished = eval_env.reset(), []
    while len(finished) < EVAL_EPISODES:
        obs, _, done, infos = eval_env.step(model.predict(obs, deterministic=True)[0])
        finished += [info["episode"]["r"] for d, info in zip(done, infos) if d and "episode" in info]
    return {"final_return": float(np.mean(returns)), "frames": model.num_timesteps,
            "wall_time_s": wall, "sps": model.num_timesteps / wall,
            "vecnormalize": not args.sb3_no_normalize, "curve": curve.points,
            "eval_return": float(np.mean(finished))}


# -- driver ------------------------------------------------------------------------------------------
def summarise(args, results: dict[str, dict], pending: list[str]) -> dict:
    tasks = {}
    for task in args.tasks:
        sides = {}
        for side in ("prunerl", "sb3"):
            runs = {str(s): results[f"{task}_{side}_s{s}"] for s in args.seeds if f"{task}_{side}_s{s}" in results}
            train = {k: r["final_return"] for k, r in runs.items()}
            evals = {k: r["eval_return"] for k, r in runs.items() if r.get("eval_return") is not None}
            sides[side] = {"per_seed": train, "median": statistics.median(train.values()) if train else None,
                           "per_seed_eval": evals,
                           "median_eval": statistics.median(evals.values()) if evals else None,
                           "runs": {k: v for k, v in results.items() if k.startswith(f"{task}_{side}_")}}

        def rule(key):
            p, s = sides["prunerl"][key], sides["sb3"][key]
            return {"prunerl_median": p, "sb3_median": s,
                    "pass": (p >= s) if (p is not None and s is not None) else None}

        target = {"rule": f"PruneRL median >= SB3 median of the final policy's deterministic return "
                          f"({EVAL_EPISODES} episodes)", **rule("median_eval"),
                  "training_return": {"rule": f"the same on the mean return of the last {LAST_EPISODES} "
                                              "training episodes (sampled actions)", **rule("median")}}
        tasks[task] = {"env_id": GYM_IDS[task], "prunerl": sides["prunerl"], "sb3": sides["sb3"], "target": target}
    done = not pending
    verdicts = [t["target"]["pass"] for t in tasks.values()]
    recipe = ({"prunerl": "conf/ defaults (algo=ppo), κ = 0, pruning=none", "sb3": "PPO('MlpPolicy') defaults + VecNormalize"}
              if args.recipe == "default" else
              {"both": "SB3's recipe (benchmarks/_common.py)", "frames_per_batch": FRAMES_PER_BATCH, "epochs": 10,
               "minibatch_size": 64, "hidden": [64, 64], "learned_log_std": True, "ent_coef": 0.0,
               "max_grad_norm": 0.5, "prunerl_num_envs": args.num_envs})
    return {
        "benchmark": "learning",
        "recipe": args.recipe,
        "command": shlex.join(["python", *sys.argv]),
        "complete": done,
        "pending": pending,
        "settings": {"frames": args.frames, "seeds": args.seeds, "tasks": args.tasks, **recipe,
                     "sb3_num_envs": 1, "sb3_vecnormalize": not args.sb3_no_normalize,
                     "figure": f"the final policy's mean raw return over {EVAL_EPISODES} deterministic episodes "
                               "(normaliser frozen), and the mean raw return of the last "
                               f"{LAST_EPISODES} training episodes (sampled actions)"},
        "tasks": tasks,
        "target": {"rule": "on every task, PruneRL median >= SB3 median",
                   "pass": all(verdicts) if verdicts and None not in verdicts else None, "final": done},
        "machine": machine_info(),
    }


def plot(summary: dict, path: Path) -> None:
    """Training curves per task: each seed thin, the median over seeds (on a common grid) thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(summary["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for side, color in (("prunerl", "tab:blue"), ("sb3", "tab:orange")):
            runs = [r for r in summary["tasks"][task][side]["runs"].values() if r.get("curve")]
            grid = np.linspace(0, summary["settings"]["frames"], 50)
            interp = []
            for r in runs:
                x, y = np.asarray(r["curve"], float).T
                ax.plot(x, y, color=color, lw=0.6, alpha=0.35)
                interp.append(np.interp(grid, x, y, left=np.nan))
            if interp:
                label = f"{'PruneRL (default recipe, κ=0)' if side == 'prunerl' else 'SB3 PPO (defaults)'}"
                ax.plot(grid, np.nanmedian(np.asarray(interp), 0), color=color, lw=2, label=label)
        t = summary["tasks"][task]["target"]
        ax.set(title=f"{summary['tasks'][task]['env_id']}: deterministic {t['prunerl_median'] or 0:,.0f} vs "
                     f"{t['sb3_median'] or 0:,.0f}", xlabel="frames", ylabel="training return (last 20 episodes)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=["default", "sb3"], default="default")
    p.add_argument("--tasks", nargs="+", choices=list(GYM_IDS), default=list(GYM_IDS))
    p.add_argument("--frames", type=int, default=500_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--num-envs", type=int, default=16, help="PruneRL envs in its one process")
    p.add_argument("--sb3-no-normalize", action="store_true", help="SB3 without VecNormalize")
    p.add_argument("--out", type=Path, default=None,
                   help="summary JSON (default: results/learning_tasks.json; results/learning.json for --recipe sb3)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="per-run results and PruneRL run dirs (default: <out without .json>_runs)")
    p.add_argument("--worker", choices=["prunerl", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--task", choices=list(GYM_IDS), default="hopper", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / ("learning.json" if args.recipe == "sb3" else "learning_tasks.json")
    if args.runs_dir is None:
        args.runs_dir = args.out.with_name(args.out.stem + "_runs")

    if args.worker:
        res = _worker_prunerl(args) if args.worker == "prunerl" else _worker_sb3(args)
        res.update(side=args.worker, seed=args.seed, task=args.task, recipe=args.recipe)
        write_json(Path(args.runs_dir) / f"{args.task}_{args.worker}_s{args.seed}.json", res)
        print("BENCH_RESULT " + json.dumps(res), flush=True)
        return 0

    ensure_sb3()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [f"{t}_{side}_s{s}" for t in args.tasks for s in args.seeds for side in ("prunerl", "sb3")]
    results = {}
    recipes: dict[str, dict] = {}

    def now_algo(task: str) -> dict:
        if task not in recipes:
            recipes[task] = _recipe_algo(args, task)
        return recipes[task]

    for j in jobs:
        f = args.runs_dir / f"{j}.json"
        if f.exists():
            r = json.loads(f.read_text())
            if r.get("frames", 0) >= args.frames and (args.recipe == "sb3" or "eval_return" in r):
                task = j.split("_", 1)[0]
                if "_prunerl_" in j and not _same_recipe(r.get("algo", now_algo(task)), now_algo(task)):
                    print(f"{j}: its recipe is not today's ({f}); training it again", flush=True)
                    shutil.rmtree(args.runs_dir / f"{j}_run", ignore_errors=True)  # its run dir is of the old recipe
                    continue
                results[j] = r
    todo = [j for j in jobs if j not in results]
    running: dict[str, subprocess.Popen] = {}
    write_json(args.out, summarise(args, results, todo))
    while todo or running:
        while todo and len(running) < args.parallel:
            j = todo.pop(0)
            task, rest = j.split("_", 1)
            side, seed = rest.rsplit("_s", 1)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--seed", seed,
                   "--task", task, "--recipe", args.recipe,
                   "--frames", str(args.frames), "--num-envs", str(args.num_envs),
                   "--runs-dir", str(args.runs_dir)] + (["--sb3-no-normalize"] if args.sb3_no_normalize else [])
            log = open(args.runs_dir / f"{j}.log", "w")
            running[j] = subprocess.Popen(cmd, cwd=REPO, env=single_thread_env(), stdout=log,
                                          stderr=subprocess.STDOUT)
            print(f"started {j} (pid {running[j].pid})", flush=True)
        time.sleep(2)
        for j, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[j]
            f = args.runs_dir / f"{j}.json"
            if proc.returncode == 0 and f.exists():
                results[j] = json.loads(f.read_text())
                print(f"finished {j}: final return {results[j]['final_return']:.0f}", flush=True)
            else:
                print(f"FAILED {j} (exit {proc.returncode}); see {args.runs_dir / (j + '.log')}", flush=True)
            write_json(args.out, summarise(args, results, todo + list(running)))
    summary = summarise(args, results, [])
    write_json(args.out, summary)
    plot(summary, args.out.with_suffix(".png"))
    for task, t in summary["tasks"].items():
        t = t["target"]
        print(f"{task}: deterministic return, median PruneRL {t['prunerl_median']} vs SB3 {t['sb3_median']}: "
              f"{'PASS' if t['pass'] else 'FAIL'}; training return {t['training_return']['prunerl_median']} vs "
              f"{t['training_return']['sb3_median']}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
