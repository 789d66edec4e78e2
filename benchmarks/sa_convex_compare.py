"""Cost of the SA regulariser per update: ``algo.sa.method=sgld`` (10 SGLD steps; and the CPU recipe's 5) vs ``convex``
(the certified KL bound, β > 0: IBP and CROWN-IBP passes; β = 0: IBP alone).

One process, one torch thread, Hopper shapes: a 11-256-256-3 tanh actor (learned σ starting at 1)
and its critic, minibatches of 128 (Hopper's default: 16 per 2,048-frame rollout), cut from one real
Hopper rollout by PruneRL's own datamodule; ε = 0.075 from the first update (no ramp), κ = 0.3. For
each method it times

- ``regularizer/<variant>``: R_SA and its backward alone (``prunerl.sa.sa_regularizer`` with μ(s)
  given, or ``sa_regularizer_convex``), gradients into the actor;
- ``update/<variant>``: the whole :meth:`PPOModule.training_step` (forward, PPO + SA loss, backward,
  clipping, fused Adam; no Trainer), each variant from the same initial weights over the same
  minibatches; ``update/kappa0`` is the same update without SA, for scale.

Variants: ``sgld`` (10 steps of ε/10, the fast inner loop), ``sgld5`` (5 of ε/5, the CPU recipe's default), ``convex_beta0.5`` (β = 0.5: both passes;
any β in (0, 1] costs the same) and ``convex_beta0`` (IBP only). Each repeat runs every variant once
in an order that rotates with the repeat, ``--calls`` calls each after ``--warmup`` untimed ones;
the figures are medians over ``--repeats`` of ms per call, ratios are of medians against sgld.
Writes ``results/sa_convex_cost.json``:

    python benchmarks/sa_convex_compare.py [--repeats 5] [--calls 32] [--warmup 8]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (REPO, interleaved_runs, load_average, machine_info,  # noqa: E402
                               training_step_timer, without_trainer, write_json)

EPS, STEPS, STEP_RATIO, KAPPA, HIDDEN, MINIBATCHES = 0.075, 10, 0.1, 0.3, (256, 256), 16
#: name: (method, β, SGLD steps, step / ε); "sgld" is SA-PPO's 10-step loop (the issue's comparison),
#: "sgld5" the CPU recipe's default (conf/algo/ppo.yaml: 5 steps of ε/5)
VARIANTS = {"sgld": ("sgld", 0.0, STEPS, STEP_RATIO), "sgld5": ("sgld", 0.0, 5, 0.2),
            "convex_beta0.5": ("convex", 0.5, STEPS, STEP_RATIO), "convex_beta0": ("convex", 0.0, STEPS, STEP_RATIO)}


def rollout_minibatches(seed: int = 0) -> list:
    """One real Hopper rollout (2,048 frames, 16 envs, an initial 256x256 policy), shuffled and cut
    into 16 minibatches of 128 by PruneRL's datamodule."""
    from prunerl.data import RolloutDataModule
    from prunerl.envs import make_env
    from prunerl.models import Critic, GaussianActor

    torch.manual_seed(seed)
    env = make_env("hopper", 16, seed)
    actor, critic = GaussianActor(11, 3, HIDDEN, "tanh", 1.0, learn_std=True), Critic(11, HIDDEN, "tanh")
    dm = RolloutDataModule(env, actor, critic, frames_per_batch=2048, epochs=1, minibatches=MINIBATCHES,
                           gamma=0.99, lmbda=0.95, seed=seed, device=torch.device("cpu"))
    batches = list(dm.train_dataloader())
    env.close()
    return batches


def make_module(kappa: float, method: str, beta: float, seed: int = 0, steps: int = STEPS,
                step_ratio: float = STEP_RATIO):
    """A PPOModule (the default recipe's hyper-parameters) stepping without a Trainer; β fixed."""
    from prunerl.models import Critic, GaussianActor
    from prunerl.module import PPOModule

    torch.manual_seed(seed)
    actor = GaussianActor(11, 3, HIDDEN, "tanh", 1.0, learn_std=True)
    critic = Critic(11, HIDDEN, "tanh")
    module = PPOModule(actor, critic, total_updates=10**6, kappa=kappa, eps=EPS, sa_steps=steps,
                       sa_step_ratio=step_ratio, eps_ramp=0.0, ent_coef=0.01, max_grad_norm=1.0,
                       sa_method=method, beta_start=beta, beta_end=beta, beta_ramp=0.0)
    without_trainer(module)
    return module


def update_timer(kappa: float, method: str, beta: float, batches: list, steps: int = STEPS,
                 step_ratio: float = STEP_RATIO):
    """A function timing ``n`` training steps (ms per step), continuing over the minibatches."""
    module = make_module(kappa, method, beta, steps=steps, step_ratio=step_ratio)
    return training_step_timer(module, batches)


def regularizer_timer(method: str, beta: float, batches: list, steps: int = STEPS, step_ratio: float = STEP_RATIO):
    """A function timing ``n`` evaluations of R_SA and its backward (ms per call), μ(s) given."""
    from prunerl.sa import sa_regularizer, sa_regularizer_convex

    actor = make_module(KAPPA, method, beta).actor
    with torch.no_grad():
        inputs = [(b["observation"], actor(b["observation"])) for b in batches]
    state = {"i": 0}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            obs, mean = inputs[state["i"] % len(inputs)]
            if method == "sgld":
                reg, _ = sa_regularizer(actor, obs, actor.std, EPS, steps, EPS * step_ratio, mean=mean)
            else:
                reg = sa_regularizer_convex(actor, obs, actor.std, EPS, beta, mean=mean)
            reg.backward()
            state["i"] += 1
        dt = time.perf_counter() - t0
        actor.zero_grad(set_to_none=True)
        return dt / n * 1e3
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=32, help="timed calls per variant and repeat")
    p.add_argument("--warmup", type=int, default=8, help="untimed calls per variant before the repeats")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sa_convex_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    load_before = load_average()
    t_start = time.perf_counter()
    batches = rollout_minibatches()
    timers: dict[str, callable] = {}
    for name, (method, beta, steps, ratio) in VARIANTS.items():
        timers[f"regularizer/{name}"] = regularizer_timer(method, beta, batches, steps, ratio)
    for name, (method, beta, steps, ratio) in VARIANTS.items():
        timers[f"update/{name}"] = update_timer(KAPPA, method, beta, batches, steps, ratio)
    timers["update/kappa0"] = update_timer(0.0, "sgld", 0.0, batches)
    runs = interleaved_runs(timers, warmup=args.warmup, repeats=args.repeats, calls=args.calls, digits=2)

    median = {k: statistics.median(v) for k, v in runs.items()}
    vs_sgld = {k: median[k] / median[f"{k.split('/')[0]}/sgld"] for k in median if not k.endswith("/sgld")
               and f"{k.split('/')[0]}/sgld" in median}
    vs_sgld5 = {k: median[k] / median[f"{k.split('/')[0]}/sgld5"] for k in median
                if k.split("/")[1].startswith("convex")}
    result = {
        "benchmark": "sa_convex_compare",
        "command": shlex.join(["python", *(sys.argv if argv is None else [__file__, *argv])]),
        "settings": {"task": "hopper", "obs_dim": 11, "act_dim": 3, "hidden": list(HIDDEN), "activation": "tanh",
                     "minibatch": 2048 // MINIBATCHES, "minibatches": len(batches), "kappa": KAPPA, "eps": EPS,
                     "sgld_steps": STEPS, "step_ratio": STEP_RATIO, "learn_std": True,
                     "variants": {k: {"method": m, "beta": b, "sgld_steps": n, "step_ratio": r}
                                  for k, (m, b, n, r) in VARIANTS.items()},
                     "calls": args.calls, "warmup": args.warmup, "repeats": args.repeats, "torch_threads": 1,
                     "statistic": "median over repeats of ms per call; ratio = median / sgld's median"},
        "ms_per_call": median,
        "ratio_vs_sgld": vs_sgld,
        "ratio_vs_sgld5": vs_sgld5,
        "runs": runs,
        "wall_s": time.perf_counter() - t_start,
        "load_average": {"before": load_before, "after": load_average()},
        "machine": machine_info(),
    }
    write_json(args.out, result)
    for k, v in median.items():
        print(f"{k:28s} {v:7.2f} ms" + (f"  ({vs_sgld[k]:.2f}x sgld)" if k in vs_sgld else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
