"""Evaluation throughput: env steps per second of ``run_episodes`` clean and under each attack.

Same number of parallel envs for every condition (``--num-envs``: 16 = the evaluation's default
for ≥ 16 episodes, and 64), Hopper-v5, the default 256-256 tanh actor and critic, a 64-64 Q for
Robust Sarsa and a 256-256 adversary for the learned attack (weights do not change the cost, so
they are freshly initialised: no training is timed). Gradient attacks run 10 steps of ε/10 from a
random start (the defaults). Conditions are interleaved and repeated (order rotates), the median is
reported, so background load hurts every condition alike. One torch thread.

Throughput = env steps of the finished episodes / time of ``run_episodes`` (the real path: frozen
normaliser, batched env, perturbation at every control step), both per wall-clock second and per
CPU-second of this one-thread process; the ratios (and the target) use CPU time, which does not
move with the background load of a shared machine (wall-clock figures are reported too).
Target: every 10-step gradient attack (critic, mad, rs) ≥ 40% of clean throughput.

    python benchmarks/eval_throughput.py [--num-envs 16 64] [--episodes 64] [--repeats 3]
                                         [--out benchmarks/results/eval_throughput.json]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_average, machine_info, write_json  # noqa: E402

TARGET = 0.40  # minimum ratio to clean throughput for every 10-step gradient attack
GRADIENT_ATTACKS = ("critic", "mad", "rs")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-envs", type=int, nargs="+", default=[16, 64],
                   help="parallel envs (each value is a separate comparison, clean vs attacks at that value)")
    p.add_argument("--episodes", type=int, default=64, help="episodes per condition and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/eval_throughput.json")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from prunerl import attacks as A
    from prunerl.envs import TASKS, make_env, normalizer_of
    from prunerl.evaluation import run_episodes
    from prunerl.models import Critic, GaussianActor

    torch.manual_seed(0)
    env = make_env("hopper", 1, 0)
    obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    norm_state = normalizer_of(env).state_dict()
    env.close()
    actor, critic = GaussianActor(obs_dim, act_dim), Critic(obs_dim)
    q, adversary = A.QNetwork(obs_dim, act_dim), GaussianActor(obs_dim, obs_dim)
    eps = TASKS["hopper"].eps
    gen = torch.Generator().manual_seed(0)
    grad = dict(steps=10, step_size=eps / 10, random_start=True, generator=gen)
    attacks = {
        "clean": None,
        "random": A.random_attack(eps, gen),
        "critic": A.critic_attack(critic, eps, **grad),
        "mad": A.mad_attack(actor, actor.std, eps, **grad),
        "rs": A.rs_attack(q, actor, eps, **grad),
        "optimal": A.optimal_attack(adversary, eps),
    }
    names = list(attacks)
    load_before = load_average()
    by_envs = {}
    for n_envs in args.num_envs:
        sps: dict[str, list[float]] = {n: [] for n in names}  # per wall-clock second
        spc: dict[str, list[float]] = {n: [] for n in names}  # per CPU-second of this process
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                t0, c0 = time.perf_counter(), time.process_time()
                r = run_episodes(actor, norm_state, "hopper", args.episodes, seed=rep, num_envs=n_envs,
                                 perturb=attacks[name])
                steps = sum(r["lengths"])
                sps[name].append(steps / (time.perf_counter() - t0))
                spc[name].append(steps / (time.process_time() - c0))
                print(f"{n_envs} envs  repeat {rep}  {name:<8} {sps[name][-1]:8.0f} steps/s  "
                      f"{spc[name][-1]:8.0f} steps/CPU-s", flush=True)
        median = {n: statistics.median(v) for n, v in sps.items()}
        median_cpu = {n: statistics.median(v) for n, v in spc.items()}
        # ratios from CPU time: one thread, so CPU time is the work done, whatever else the machine runs
        ratios = {n: median_cpu[n] / median_cpu["clean"] for n in names if n != "clean"}
        by_envs[str(n_envs)] = {
            "steps_per_cpu_second_median": median_cpu, "steps_per_second_median": median,
            "steps_per_cpu_second_all": spc, "steps_per_second_all": sps,
            "ratio_to_clean": ratios, "ratio_to_clean_wall": {n: median[n] / median["clean"] for n in ratios},
            "target_met": all(ratios[n] >= TARGET for n in GRADIENT_ATTACKS),
        }
    result = {
        "benchmark": "evaluation throughput (env steps/s of run_episodes), Hopper-v5",
        "command": "python benchmarks/eval_throughput.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "episodes_per_condition": args.episodes, "repeats": args.repeats,
        "eps": eps, "attack_steps": 10, "step_size": eps / 10, "torch_threads": 1,
        "by_num_envs": by_envs,
        "target": {"gradient_attacks": list(GRADIENT_ATTACKS), "min_ratio_to_clean": TARGET,
                   "met": {k: v["target_met"] for k, v in by_envs.items()}},
        "load_average_before": load_before, "load_average_after": load_average(),
        "machine": machine_info(),
    }
    write_json(Path(args.out), result)
    for n_envs, r in by_envs.items():
        med, rat = r["steps_per_cpu_second_median"], r["ratio_to_clean"]
        print(f"-- {n_envs} envs (steps per CPU-second): " + ", ".join(f"{n} {med[n]:.0f}" + ("" if n == "clean" else f" ({rat[n]:.0%})")
                                           for n in names)
              + f"; target (gradient attacks ≥ {TARGET:.0%} of clean) {'met' if r['target_met'] else 'NOT met'}")
    print(f"->  {args.out}")
    return result


if __name__ == "__main__":
    main()
