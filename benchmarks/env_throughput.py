"""Env throughput: frames per second of each physics engine (``env.engine``), per task and env count.

For every task and every ``--num-envs`` value, each engine steps ``--steps`` batched steps of
uniformly random actions, with auto-resets, through the path training uses: ``make_env`` (the
batched TorchRL env + the running normaliser) and ``step_and_maybe_reset`` — the TorchRL level.
The same is timed without TorchRL on the engine alone (``engine.step`` + resets of done envs) —
the engine level; and, as an outside reference at that level, Gymnasium's own
``gymnasium.vector.SyncVectorEnv`` of the same envs (one process, no threads).

Both engines run with ``--threads`` threads (``env.threads``; the default config uses 2). All
conditions of one (task, num_envs) are interleaved, the order rotating each repeat, so background
load hurts them alike; the figure is the median over ``--repeats`` of wall-clock frames/s (the
engines use several cores, so CPU time would not compare them), and the speed-up of the mujoco
engine is the ratio of medians against the gymnasium engine at the same level, measured in this
run. One torch thread. Load averages before and after are recorded: on a loaded machine the
absolute figures mean little, the ratios more.

    python benchmarks/env_throughput.py [--tasks hopper walker2d halfcheetah ant inverted_pendulum]
        [--num-envs 16 64] [--steps 500] [--repeats 5] [--threads 2]
        [--out benchmarks/results/env_throughput.json]
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

ENGINES = ("gymnasium", "mujoco")


def _torchrl_fps(task: str, engine: str, num_envs: int, steps: int, threads: int, seed: int) -> float:
    import torch

    from prunerl.envs import make_env

    env = make_env(task, num_envs, seed, threads=threads, engine=engine)
    g = torch.Generator().manual_seed(seed)
    low, high = env.action_spec.space.low, env.action_spec.space.high
    actions = low + (high - low) * torch.rand((steps + 10, *env.action_spec.shape), generator=g)
    td = env.reset()
    for t in range(10):  # warm-up: caches, first allocations
        td["action"] = actions[t]
        _, td = env.step_and_maybe_reset(td)
    t0 = time.perf_counter()
    for t in range(10, steps + 10):
        td["action"] = actions[t]
        _, td = env.step_and_maybe_reset(td)
    fps = steps * num_envs / (time.perf_counter() - t0)
    env.close()
    return fps


def _engine_fps(task: str, engine: str, num_envs: int, steps: int, threads: int, seed: int) -> float:
    import numpy as np

    from prunerl.envs import TASKS, make_engine

    e = make_engine(engine, TASKS[task].env_id, num_envs, threads)
    rng = np.random.default_rng(seed)
    actions = rng.uniform(e.action_low, e.action_high, size=(steps + 10, num_envs, len(e.action_low)))
    e.reset(np.arange(num_envs), [seed + i for i in range(num_envs)])
    t0 = 0.0
    for t in range(steps + 10):
        if t == 10:
            t0 = time.perf_counter()
        _, _, term, trunc = e.step(actions[t])
        done = np.flatnonzero(term | trunc)
        if len(done):
            e.reset(done, [None] * len(done))
    fps = steps * num_envs / (time.perf_counter() - t0)
    e.close()
    return fps


def _sync_vector_fps(task: str, num_envs: int, steps: int, seed: int) -> float:
    """Gymnasium's SyncVectorEnv (autoreset after the step, as ours), float64 actions."""
    import gymnasium as gym
    import numpy as np

    from prunerl.envs import TASKS

    env = gym.vector.SyncVectorEnv([lambda: gym.make(TASKS[task].env_id, disable_env_checker=True)] * num_envs,
                                   autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    env.reset(seed=seed)
    space = env.single_action_space
    rng = np.random.default_rng(seed)
    actions = rng.uniform(space.low, space.high, size=(steps + 10, num_envs, space.shape[0]))
    t0 = 0.0
    for t in range(steps + 10):
        if t == 10:
            t0 = time.perf_counter()
        env.step(actions[t])
    fps = steps * num_envs / (time.perf_counter() - t0)
    env.close()
    return fps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["hopper", "walker2d", "halfcheetah", "ant", "inverted_pendulum"])
    p.add_argument("--num-envs", type=int, nargs="+", default=[16, 64])
    p.add_argument("--steps", type=int, default=500, help="timed batched steps per measurement (after 10 warm-up)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="env.threads of both engines")
    p.add_argument("--out", default="benchmarks/results/env_throughput.json")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    load_before = load_average()
    conditions = [(level, engine) for level in ("torchrl", "engine") for engine in ENGINES] + [("engine", "sync_vector_env")]
    rows = []
    for task in args.tasks:
        for n in args.num_envs:
            fps: dict[tuple[str, str], list[float]] = {c: [] for c in conditions}
            for rep in range(args.repeats):
                for k in range(len(conditions)):
                    level, engine = conditions[(k + rep) % len(conditions)]
                    if engine == "sync_vector_env":
                        f = _sync_vector_fps(task, n, args.steps, seed=rep)
                    elif level == "torchrl":
                        f = _torchrl_fps(task, engine, n, args.steps, args.threads, seed=rep)
                    else:
                        f = _engine_fps(task, engine, n, args.steps, args.threads, seed=rep)
                    fps[(level, engine)].append(f)
            med = {c: statistics.median(v) for c, v in fps.items()}
            for (level, engine), values in fps.items():
                rows.append({
                    "task": task, "num_envs": n, "level": level, "engine": engine,
                    "threads": 1 if engine == "sync_vector_env" else args.threads,
                    "fps_median": round(med[(level, engine)], 1), "fps": [round(v, 1) for v in values],
                    "vs_gymnasium_engine": round(med[(level, engine)] / med[(level, "gymnasium")], 3),
                })
            print(f"{task:>17} {n:>3} envs: " + ", ".join(
                f"{lv}/{eng} {med[(lv, eng)]:,.0f}" for lv, eng in conditions)
                + f" | mujoco/gymnasium torchrl {med[('torchrl', 'mujoco')] / med[('torchrl', 'gymnasium')]:.2f}x",
                flush=True)
    result = {
        "benchmark": "env throughput: frames/s of env.engine=mujoco vs env.engine=gymnasium, random actions",
        "command": "python benchmarks/env_throughput.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "settings": {"tasks": args.tasks, "num_envs": args.num_envs, "steps": args.steps, "warmup_steps": 10,
                     "repeats": args.repeats, "threads": args.threads, "torch_threads": 1,
                     "statistic": "median of repeats, wall-clock frames/s"},
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine_info(),
        "results": rows,
    }
    write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
