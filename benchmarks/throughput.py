"""Training throughput: PruneRL PPO (κ=0 and κ=0.3 with SA) vs Stable-Baselines3 PPO on Hopper-v5.

Identical recipe on both sides (benchmarks/_common.py: 2048 frames/rollout, 10 epochs, minibatch
64, 64x64 tanh actor and critic, learned log-std), one torch thread per process. Each
configuration runs in its own subprocess, configurations are interleaved (the order rotates each
repeat) and the median over repeats is reported, so background load hurts every side alike.

Measured: steady-state steps per second of the whole training loop (collection + GAE + updates),
over ``--rollouts`` rollouts after one warm-up rollout that both sides exclude.
PruneRL runs its real path, ``prunerl.fit.fit(cfg)`` on a config composed from conf/ (Collector,
Lightning Trainer, checkpoints), with ``logger=none callbacks.progress=null``.

    python benchmarks/throughput.py [--rollouts 10] [--repeats 2] [--num-envs 32]
                                    [--out benchmarks/results/throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (FRAMES_PER_BATCH, REPO, compose_prunerl, ensure_sb3, load_average,  # noqa: E402
                                machine_info, prunerl_overrides, sb3_ppo, single_thread_env, write_json)

TARGETS = {"prunerl_k0": 2.0, "prunerl_k0.3": 0.75}  # minimum SPS ratio to SB3


# -- workers (run in their own process) ---------------------------------------------------------
def _worker_prunerl(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from prunerl.fit import fit

    with tempfile.TemporaryDirectory(prefix="prunerl-bench-") as tmp:
        cfg = compose_prunerl(prunerl_overrides(
            kappa=args.kappa, num_envs=args.num_envs, total_frames=FRAMES_PER_BATCH * (args.rollouts + 1),
            seed=args.seed, run_dir=str(Path(tmp) / "run"),
            extra=["+callbacks.bench_timer._target_=benchmarks.timers.SteadyStateTimer"]))
        summary = fit(cfg)
    b = summary["bench"]
    return {"sps": b["sps"], "frames": b["frames"], "wall_s": b["wall_s"], "collect_s": b["collect_s"],
            "collect_sps": b["collect_sps"], "ms_per_update": b["ms_per_update"],
            "cpu_s": b["cpu_s"], "cpu_sps": b["cpu_sps"],
            "whole_run_sps": summary["sps"], "torch_threads": torch.get_num_threads()}


def _worker_sb3(args) -> dict:
    import gymnasium as gym
    import torch

    torch.set_num_threads(1)
    from benchmarks.timers import sb3_timer

    model = sb3_ppo(gym.make("Hopper-v5"), seed=args.seed)
    timer = sb3_timer()
    model.learn(FRAMES_PER_BATCH * (args.rollouts + 1), callback=timer)
    t1, cpu1 = time.perf_counter(), time.process_time()
    frames = model.num_timesteps - timer.frames0
    wall = t1 - timer.t0
    updates = frames // FRAMES_PER_BATCH * 10 * (FRAMES_PER_BATCH // 64)
    return {"sps": frames / wall, "frames": frames, "wall_s": wall, "collect_s": timer.collect_s,
            "cpu_s": cpu1 - timer.cpu0, "cpu_sps": frames / (cpu1 - timer.cpu0),
            "collect_sps": frames / timer.collect_s, "ms_per_update": 1e3 * (wall - timer.collect_s) / updates,
            "torch_threads": torch.get_num_threads()}


# -- driver --------------------------------------------------------------------------------------
def configurations(num_envs: int) -> dict[str, list[str]]:
    return {
        "prunerl_k0": ["--worker", "prunerl", "--kappa", "0.0", "--num-envs", str(num_envs)],
        "prunerl_k0.3": ["--worker", "prunerl", "--kappa", "0.3", "--num-envs", str(num_envs)],
        "sb3": ["--worker", "sb3"],
    }


def run_one(name: str, argv: list[str], args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--rollouts", str(args.rollouts),
           "--seed", str(args.seed)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=single_thread_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {shlex.join(cmd)}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")][-1]
    res = json.loads(line[len("BENCH_RESULT "):])
    res["process_s"] = time.perf_counter() - t
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rollouts", type=int, default=10, help="timed rollouts of 2048 frames after 1 warm-up")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration (median reported)")
    p.add_argument("--num-envs", type=int, default=32, help="PruneRL envs stepped together in one process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="subset of configurations to run")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "throughput.json")
    # worker mode (internal)
    p.add_argument("--worker", choices=["prunerl", "sb3"], help=argparse.SUPPRESS)
    p.add_argument("--kappa", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        res = _worker_prunerl(args) if args.worker == "prunerl" else _worker_sb3(args)
        print("BENCH_RESULT " + json.dumps(res), flush=True)
        return 0

    sb3_version = ensure_sb3()
    configs = configurations(args.num_envs)
    names = [n for n in configs if args.only is None or n in args.only]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    load_before = load_average()
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: nobody always goes first
        for name in order:
            res = run_one(name, configs[name], args)
            res["repeat"] = rep
            runs[name].append(res)
            print(f"  repeat {rep}  {name:14s} {res['sps']:8.0f} SPS  ({res['cpu_sps']:.0f} per CPU-second; collect {res['collect_sps']:.0f} SPS, "
                  f"{res['ms_per_update']:.2f} ms/update)", flush=True)

    sps = {n: statistics.median(r["sps"] for r in runs[n]) for n in names}
    cpu_sps = {n: statistics.median(r["cpu_sps"] for r in runs[n]) for n in names}
    result = {
        "benchmark": "throughput",
        "task": "Hopper-v5",
        "command": shlex.join(["python", *(sys.argv if argv is None else [__file__, *argv])]),
        "python": sys.executable,
        "settings": {"frames_per_batch": FRAMES_PER_BATCH, "epochs": 10, "minibatch_size": 64,
                     "minibatches": FRAMES_PER_BATCH // 64, "hidden": [64, 64], "activation": "tanh",
                     "learned_log_std": True, "torch_threads_per_process": 1,
                     "warmup_rollouts_excluded": 1, "timed_rollouts": args.rollouts,
                     "timed_frames": FRAMES_PER_BATCH * args.rollouts, "repeats": args.repeats,
                     "prunerl_num_envs": args.num_envs, "sb3_num_envs": 1,
                     "sa_inner_steps": 10, "statistic": "median over repeats",
                     "measured": "steady-state wall time of the whole training loop (collection, GAE, updates)"},
        "sps_median": sps,
        "cpu_sps_median": cpu_sps,
        "note": ("sps: frames per wall-clock second (the target figure). cpu_sps: frames per second of the "
                 "process's own CPU time (single-threaded processes), a cross-check that background "
                 "load on a shared machine distorts less."),
        "runs": runs,
        "ratios": {},
        "targets": {},
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": load_average()},
    }
    result["machine"]["versions"]["stable_baselines3"] = sb3_version
    if "sb3" in sps:
        for n, target in TARGETS.items():
            if n in sps:
                ratio = sps[n] / sps["sb3"]
                result["ratios"][f"{n}/sb3"] = ratio
                cpu_ratio = cpu_sps[n] / cpu_sps["sb3"]
                result["ratios"][f"{n}/sb3 (cpu time)"] = cpu_ratio
                # per repeat: the two runs of one repeat ran minutes apart, so their ratio is less
                # exposed to the machine's slow drifts than the ratio of the medians
                paired = [a["sps"] / b["sps"] for a, b in zip(runs[n], runs["sb3"])]
                result["ratios"][f"{n}/sb3 (per repeat)"] = paired
                result["targets"][f"{n}/sb3"] = {"target": target, "ratio": ratio, "pass": ratio >= target,
                                                 "cpu_time_ratio": cpu_ratio, "cpu_time_pass": cpu_ratio >= target,
                                                 "per_repeat_ratios": paired,
                                                 "median_per_repeat_ratio": statistics.median(paired)}
    write_json(args.out, result)

    print(f"\nHopper-v5 training throughput, median of {args.repeats} (steps/s, one torch thread each)")
    print(f"{'configuration':16s} {'SPS':>8s} {'vs SB3':>8s} {'target':>14s} {'CPU-s SPS':>10s} {'vs SB3':>7s}")
    for n in names:
        t = result["targets"].get(f"{n}/sb3")
        ratio = f"{t['ratio']:.2f}x" if t else ""
        verdict = f">={t['target']}x {'PASS' if t['pass'] else 'FAIL'}" if t else ""
        cr = f"{t['cpu_time_ratio']:.2f}x" if t else ""
        print(f"{n:16s} {sps[n]:8.0f} {ratio:>8s} {verdict:>14s} {cpu_sps[n]:10.0f} {cr:>7s}")
    for n in names:
        t = result["targets"].get(f"{n}/sb3")
        if t:
            print(f"{n}/sb3 per repeat: " + ", ".join(f"{r:.2f}x" for r in t["per_repeat_ratios"])
                  + f" (median {t['median_per_repeat_ratio']:.2f}x)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
