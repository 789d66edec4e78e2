"""How much of the KL the SA inner maximisation finds with fewer, longer steps.

The CPU recipe (conf/algo/ppo.yaml) takes 5 sign-gradient steps of ε/5 where SA-PPO takes 10 of
ε/10. This measures what that costs the maximiser: for each checkpoint, ``--states`` visited
normalised states (the policy's own stochastic rollouts in the run's task, frozen normaliser), the
mean KL(π(·|s) ‖ π(·|ŝ)) that :func:`prunerl.sa.max_kl_perturbation` finds at the checkpoint's ε for
each (steps, step) pair of ``--pairs``, ``--draws`` times (different random starts), in minibatches
of 128 as the default fit's updates. Ratios are to the reference pair (10 × ε/10). No timing:
the figures do not depend on the machine's load.

    python benchmarks/sa_steps.py CKPT [CKPT ...] [--states 4096] [--draws 3]
                                  [--out benchmarks/results/sa_steps_hopper.json]

e.g. the default fit's ``checkpoints/last.ckpt`` and an early periodic checkpoint.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, machine_info, write_json  # noqa: E402
from prunerl.checkpoint import actor_from_checkpoint, load_checkpoint  # noqa: E402
from prunerl.evaluation import collect_transitions  # noqa: E402
from prunerl.sa import max_kl_perturbation  # noqa: E402

PAIRS = ((20, 20), (10, 10), (8, 8), (6, 6), (5, 5), (4, 4), (3, 3), (2, 2))  # (steps, ε / step)
REFERENCE = (10, 10)
MINIBATCH = 128


def mean_kl(actor, obs: torch.Tensor, eps: float, steps: int, step: float, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    std = actor.std.detach()
    with torch.no_grad():
        mean = actor(obs)
    kl = [max_kl_perturbation(actor, obs[i:i + MINIBATCH], std, eps, steps, step, generator=g,
                              mean=mean[i:i + MINIBATCH])[1] for i in range(0, len(obs), MINIBATCH)]
    return float(torch.cat(kl).mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--states", type=int, default=4096)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--seed", type=int, default=7, help="seeds the rollouts that give the states")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sa_steps_hopper.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        actor, norm, cfg = actor_from_checkpoint(ckpt)
        eps = cfg["algo"]["sa"]["eps"] or cfg["env"]["eps"]
        torch.manual_seed(args.seed)   # the rollouts' sampled actions come from torch's global RNG
        obs = collect_transitions(actor, norm, cfg["env"]["name"], args.states, seed=args.seed,
                                  engine=cfg["env"].get("engine", "mujoco"))["observation"]
        row = {"checkpoint": str(path), "task": cfg["env"]["name"], "kappa": cfg["algo"]["kappa"],
               "update": ckpt.get("global_step"), "trained_with": {"sa": cfg["algo"]["sa"],
                                                                    "total_frames": cfg["total_frames"]},
               "eps": eps, "states": len(obs), "mean_kl": {}}
        for steps, div in PAIRS:
            kls = [mean_kl(actor, obs, eps, steps, eps / div, seed) for seed in range(args.draws)]
            row["mean_kl"][f"{steps}x(eps/{div})"] = kls
            print(f"{path.name}: {steps:2d} steps of ε/{div:<2d} mean KL {sum(kls) / len(kls):.5f}", flush=True)
        ref = sum(row["mean_kl"][f"{REFERENCE[0]}x(eps/{REFERENCE[1]})"]) / args.draws
        row["ratio_to_reference"] = {k: sum(v) / len(v) / ref for k, v in row["mean_kl"].items()}
        results.append(row)
    write_json(args.out, {
        "benchmark": "sa_steps: mean KL found by the SA inner loop per (steps, step size), vs 10 steps of ε/10",
        "command": "python benchmarks/sa_steps.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "settings": {"states": args.states, "draws": args.draws, "minibatch": MINIBATCH, "seed": args.seed,
                     "noise": 1e-5, "random_start": True, "pairs": [list(x) for x in PAIRS]},
        "results": results, "machine": machine_info()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
