"""The SA inner maximisation and the whole PPO+SA update: the reference loop vs the fast one.

One process, one torch thread, real data: one 2,048-frame Hopper rollout collected by PruneRL's
own datamodule (16 envs, the default engine) and cut into its 32 minibatches of 64, as the
default ``fit`` does (κ = 0.3, ε = 0.075 from the first update, 10 steps of ε/10, learned σ
starting at 1). For each network size in ``--hidden`` (default: 256x256, the default fit, and
64x64, the throughput benchmark's recipe) it times

- ``inner_loop/<impl>``: :func:`prunerl.sa.max_kl_perturbation` on one minibatch with μ(s) given,
  as the update calls it — ``impl`` ``reference`` (the loop before the fast path) or ``auto``
  (the fast path);
- ``update/<impl>``: :meth:`PPOModule.training_step` with ``sa_input_gradient=impl`` (forward,
  PPO + SA loss, backward, clipping, fused Adam; the Trainer's loop and callbacks are not in it —
  ``throughput.py`` times those), each implementation from the same initial weights over the same
  minibatches;
- ``update/kappa0``: the same update with κ = 0 (no inner loop), for scale.

Each repeat runs every variant once, in an order that rotates with the repeat, ``--calls`` calls
each after ``--warmup`` untimed ones; the figures are medians over ``--repeats`` of ms per call,
the speedups are ratios of medians (and the per-repeat ratios are kept). ``--threads 1 2`` times
every variant at each torch thread count too (``torch_threads`` in ``conf/config.yaml`` is 1; the
updates run after collection, so a second core is idle then). Writes ``results/sa_update.json``.
Run it on an idle machine:

    python benchmarks/sa_update.py [--repeats 7] [--calls 256] [--hidden 256,256 64,64] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (REPO, interleaved_runs, load_average, machine_info,  # noqa: E402
                               training_step_timer, without_trainer, write_json)

EPS, STEPS, STEP_RATIO, KAPPA = 0.075, 10, 0.1, 0.3
IMPLS = ("reference", "auto")


def rollout_minibatches(seed: int = 0) -> list:
    """One real Hopper rollout (2,048 frames, 16 envs, an initial 256x256 policy), shuffled and cut
    into 32 minibatches of 64 by PruneRL's datamodule."""
    from prunerl.data import RolloutDataModule
    from prunerl.envs import make_env
    from prunerl.models import Critic, GaussianActor

    torch.manual_seed(seed)
    env = make_env("hopper", 16, seed)
    actor, critic = GaussianActor(11, 3, (256, 256), "tanh", 1.0, learn_std=True), Critic(11, (256, 256), "tanh")
    dm = RolloutDataModule(env, actor, critic, frames_per_batch=2048, epochs=1, minibatches=32, gamma=0.99,
                           lmbda=0.95, seed=seed, device=torch.device("cpu"))
    batches = list(dm.train_dataloader())
    env.close()
    return batches


def make_module(hidden: tuple[int, ...], kappa: float, impl: str, seed: int = 0):
    """A PPOModule (the default recipe's hyper-parameters) stepping without a Trainer."""
    from prunerl.models import Critic, GaussianActor
    from prunerl.module import PPOModule

    torch.manual_seed(seed)
    actor = GaussianActor(11, 3, hidden, "tanh", 1.0, learn_std=True)
    critic = Critic(11, hidden, "tanh")
    module = PPOModule(actor, critic, total_updates=10**6, kappa=kappa, eps=EPS, sa_steps=STEPS,
                       sa_step_ratio=STEP_RATIO, eps_ramp=0.0, ent_coef=0.01, max_grad_norm=1.0,
                       sa_input_gradient=impl)
    without_trainer(module)
    return module


def update_timer(hidden, kappa: float, impl: str, batches: list):
    """A function timing ``n`` training steps (ms per step), continuing over the minibatches; every
    implementation starts from the same weights (same seed) and sees the same minibatch sequence."""
    module = make_module(hidden, kappa, impl)
    return training_step_timer(module, batches)


def inner_loop_timer(hidden, impl: str, batches: list):
    """A function timing ``n`` inner maximisations (ms per call) on the minibatches, μ(s) given."""
    from prunerl.sa import max_kl_perturbation

    module = make_module(hidden, KAPPA, impl)
    actor = module.actor
    with torch.no_grad():
        inputs = [(b["observation"], actor(b["observation"])) for b in batches]
    std = actor.std.detach()
    state = {"i": 0}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            obs, mean = inputs[state["i"] % len(inputs)]
            max_kl_perturbation(actor, obs, std, EPS, STEPS, EPS * STEP_RATIO, mean=mean, input_gradient=impl)
            state["i"] += 1
        return (time.perf_counter() - t0) / n * 1e3
    return run


def with_threads(n: int, timer):
    """``timer`` run with ``n`` torch threads (set back to 1 after)."""
    def run(calls: int) -> float:
        torch.set_num_threads(n)
        try:
            return timer(calls)
        finally:
            torch.set_num_threads(1)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=256, help="timed calls per variant and repeat")
    p.add_argument("--warmup", type=int, default=32, help="untimed calls per variant before the repeats")
    p.add_argument("--hidden", nargs="+", default=["256,256", "64,64"],
                   help="network sizes, each comma-separated widths (default: 256,256 64,64)")
    p.add_argument("--threads", nargs="+", type=int, default=[1], help="torch thread counts (default: 1)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sa_update.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from prunerl import sa

    load_before = load_average()
    batches = rollout_minibatches()
    sizes = [tuple(int(w) for w in h.split(",")) for h in args.hidden]
    tags = [("x".join(map(str, h)) + ("" if args.threads == [1] else f"/t{n}"), h, n)
            for h in sizes for n in args.threads]
    timers: dict[str, callable] = {}
    for tag, hidden, threads in tags:
        for impl in IMPLS:
            timers[f"{tag}/inner_loop/{impl}"] = with_threads(threads, inner_loop_timer(hidden, impl, batches))
        for impl in IMPLS:
            timers[f"{tag}/update/{impl}"] = with_threads(threads, update_timer(hidden, KAPPA, impl, batches))
        timers[f"{tag}/update/kappa0"] = with_threads(threads, update_timer(hidden, 0.0, "auto", batches))
    runs = interleaved_runs(timers, warmup=args.warmup, repeats=args.repeats, calls=args.calls, digits=3)

    median = {k: statistics.median(v) for k, v in runs.items()}
    speedup, per_repeat = {}, {}
    for tag, _, _ in tags:
        for what in ("inner_loop", "update"):
            old, new = runs[f"{tag}/{what}/reference"], runs[f"{tag}/{what}/auto"]
            speedup[f"{tag}/{what}"] = statistics.median(old) / statistics.median(new)
            per_repeat[f"{tag}/{what}"] = [a / b for a, b in zip(old, new)]
    onednn = sa._onednn_linear() is not None
    result = {
        "benchmark": "sa_update",
        "command": shlex.join(["python", *(sys.argv if argv is None else [__file__, *argv])]),
        "settings": {"task": "hopper", "minibatch": 64, "minibatches": len(batches), "activation": "tanh",
                     "hidden": [list(h) for h in sizes], "kappa": KAPPA, "eps": EPS, "steps": STEPS,
                     "step_ratio": STEP_RATIO, "learn_std": True, "calls": args.calls, "warmup": args.warmup,
                     "repeats": args.repeats, "torch_threads": args.threads,
                     "onednn_linear": onednn, "onednn_min_weights": sa.ONEDNN_MIN_WEIGHTS,
                     "statistic": "median over repeats of ms per call; speedup = reference / auto"},
        "ms_per_call": median,
        "calls_per_s": {k: 1e3 / v for k, v in median.items()},
        "speedup": speedup,
        "speedup_per_repeat": per_repeat,
        "runs": runs,
        "load_average": {"before": load_before, "after": load_average()},
        "machine": machine_info(),
    }
    write_json(args.out, result)
    for k, v in median.items():
        print(f"{k:32s} {v:7.3f} ms  ({1e3 / v:8.1f} /s)")
    for k, v in speedup.items():
        print(f"speedup {k:24s} {v:5.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
