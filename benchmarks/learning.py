"""Learning: PruneRL PPO (κ=0) vs Stable-Baselines3 PPO on Hopper-v5 at SB3's default recipe.

Recipe on both sides (benchmarks/_common.py): 2048 frames/rollout, 10 epochs, minibatch 64,
64x64 tanh actor and critic, learned log-std starting at 0, entropy coefficient 0, lr 3e-4,
γ 0.99, GAE λ 0.95, clip 0.2, value coefficient 0.5, gradient-norm clip 0.5. Observations are
normalised (running mean/std, clipped ±10) and rewards scaled by the running std of the
discounted return on both sides: PruneRL always does this, and SB3 gets the same through its
``VecNormalize`` (``--sb3-no-normalize`` runs SB3 without it).

Figure per run: the mean raw (unscaled) return of the last 20 *training* episodes (stochastic
policy), as SB3 and PruneRL both report during training. Target: PruneRL's median over seeds
≥ SB3's median.

Runs go at most ``--parallel`` at a time (one torch thread each). Every finished run writes
``<runs-dir>/<side>_s<seed>.json`` and the summary JSON is rewritten; a rerun skips runs whose
file exists (so an interrupted benchmark resumes where it stopped).

    python benchmarks/learning.py [--frames 1000000] [--seeds 0 1 2] [--parallel 2]
                                  [--out benchmarks/results/learning.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (FRAMES_PER_BATCH, REPO, compose_prunerl, ensure_sb3, machine_info,  # noqa: E402
                                prunerl_overrides, sb3_ppo, single_thread_env, write_json)

LAST_EPISODES = 20


# -- workers ---------------------------------------------------------------------------------------
def _worker_prunerl(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from prunerl.fit import fit

    run_dir = Path(args.runs_dir) / f"prunerl_s{args.seed}_run"
    cfg = compose_prunerl(prunerl_overrides(kappa=0.0, num_envs=args.num_envs, total_frames=args.frames,
                                            seed=args.seed, run_dir=str(run_dir),
                                            extra=["algo.adam_eps=1e-8"]))
    summary = fit(cfg)
    return {"final_return": summary["train_return"], "frames": summary["frames"],
            "episodes": summary["episodes"], "wall_time_s": summary["wall_time_s"], "sps": summary["sps"],
            "run_dir": str(run_dir), "num_envs": args.num_envs}


def _worker_sb3(args) -> dict:
    import gymnasium as gym
    import numpy as np
    import torch
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    torch.set_num_threads(1)
    env = DummyVecEnv([lambda: Monitor(gym.make("Hopper-v5"))])
    if not args.sb3_no_normalize:
        env = VecNormalize(env, norm_obs=True, norm_reward=True, clip_obs=10.0, gamma=0.99)
    model = sb3_ppo(env, seed=args.seed)
    t0 = time.perf_counter()
    model.learn(args.frames)
    wall = time.perf_counter() - t0
    returns = [ep["r"] for ep in model.ep_info_buffer][-LAST_EPISODES:]
    return {"final_return": float(np.mean(returns)), "frames": model.num_timesteps,
            "wall_time_s": wall, "sps": model.num_timesteps / wall,
            "vecnormalize": not args.sb3_no_normalize}


# -- driver ------------------------------------------------------------------------------------------
def summarise(args, results: dict[str, dict], pending: list[str]) -> dict:
    sides = {}
    for side in ("prunerl", "sb3"):
        per_seed = {str(s): results[f"{side}_s{s}"]["final_return"] for s in args.seeds
                    if f"{side}_s{s}" in results}
        sides[side] = {"per_seed": per_seed,
                       "median": statistics.median(per_seed.values()) if per_seed else None,
                       "runs": {k: v for k, v in results.items() if k.startswith(side)}}
    done = not pending
    p, s = sides["prunerl"]["median"], sides["sb3"]["median"]
    return {
        "benchmark": "learning",
        "task": "Hopper-v5",
        "command": shlex.join(["python", *sys.argv]),
        "complete": done,
        "pending": pending,
        "settings": {"frames": args.frames, "seeds": args.seeds, "frames_per_batch": FRAMES_PER_BATCH,
                     "epochs": 10, "minibatch_size": 64, "hidden": [64, 64], "activation": "tanh",
                     "learned_log_std": True, "initial_log_std": 0.0, "ent_coef": 0.0, "lr": 3e-4,
                     "gamma": 0.99, "gae_lambda": 0.95, "clip": 0.2, "vf_coef": 0.5, "max_grad_norm": 0.5,
                     "prunerl_num_envs": args.num_envs, "sb3_num_envs": 1,
                     "sb3_vecnormalize": not args.sb3_no_normalize,
                     "figure": f"mean raw return of the last {LAST_EPISODES} training episodes (stochastic policy)"},
        "prunerl": sides["prunerl"],
        "sb3": sides["sb3"],
        "target": {"rule": "PruneRL median >= SB3 median", "prunerl_median": p, "sb3_median": s,
                   "pass": (p >= s) if (p is not None and s is not None) else None,
                   "final": done},
        "machine": machine_info(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--num-envs", type=int, default=16, help="PruneRL envs in its one process")
    p.add_argument("--sb3-no-normalize", action="store_true", help="SB3 without VecNormalize")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "learning.json")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="per-run results and PruneRL run dirs (default: <out without .json>_runs)")
    p.add_argument("--worker", choices=["prunerl", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs_dir is None:
        args.runs_dir = args.out.with_name(args.out.stem + "_runs")

    if args.worker:
        res = _worker_prunerl(args) if args.worker == "prunerl" else _worker_sb3(args)
        res.update(side=args.worker, seed=args.seed)
        write_json(Path(args.runs_dir) / f"{args.worker}_s{args.seed}.json", res)
        print("BENCH_RESULT " + json.dumps(res), flush=True)
        return 0

    ensure_sb3()
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [f"{side}_s{s}" for s in args.seeds for side in ("prunerl", "sb3")]
    results = {}
    for j in jobs:
        f = args.runs_dir / f"{j}.json"
        if f.exists():
            r = json.loads(f.read_text())
            if r.get("frames", 0) >= args.frames:
                results[j] = r
    todo = [j for j in jobs if j not in results]
    running: dict[str, subprocess.Popen] = {}
    write_json(args.out, summarise(args, results, todo))
    while todo or running:
        while todo and len(running) < args.parallel:
            j = todo.pop(0)
            side, seed = j.rsplit("_s", 1)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--seed", seed,
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
    t = summary["target"]
    print(f"PruneRL median {t['prunerl_median']}, SB3 median {t['sb3_median']}: "
          f"{'PASS' if t['pass'] else 'FAIL'}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
