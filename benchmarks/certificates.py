"""Per-state vs global certificates of trained policies (issue 14, item 1): is the median per-state
bound at least 100× tighter than the global one, and how do both move with sparsity?

For each run directory (``checkpoints/last.ckpt`` and ``config.yaml``, read only), it rolls the
deterministic policy μ(s) out in the run's own task (the project's Gymnasium v5 env, the
checkpoint's frozen observation normaliser) for ``--states`` steps on ``--num-envs`` envs, and over
those visited normalised states computes, for the ℓ∞ ball of the run's ε (``env.eps``):

- Δ(s) ≥ max_{ŝ∈B∞(s,ε)} ‖μ(ŝ)−μ(s)‖₂ by IBP and by CROWN (``prunerl.certify``): median, p95, mean;
- the certified TV bound c·Δ(s) (Lemma 1) and the fraction of states with c·Δ(s) ≤ 0.1;
- the global figure L̃_∞·ε (and c·L̃_∞·ε) that Thm. 1 gives for every state at once;
- what an attack actually reaches on a subset of the states (signed-gradient ascent on ‖μ(ŝ)−μ(s)‖₂,
  random starts, projected to the ball): a lower bound on the true maximum, so the gap between it
  and CROWN is how much is left to certify.

    python benchmarks/certificates.py RUN_DIR [RUN_DIR ...] [--states 2000] [--attack-states 200]

Writes benchmarks/results/certificates_hopper.json and a PNG beside it (``--out``). Not a timing
benchmark: the seconds it records are rough.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_average, machine_info, write_json  # noqa: E402

THRESHOLD = 0.1  # TV bound at or below which a state counts as certified (the callback's default)


def pgd_reach(net, states, eps: float, restarts: int = 8, steps: int = 30, seed: int = 0):
    """Per state, the largest ‖μ(ŝ)−μ(s)‖₂ a signed-gradient attack finds in the ℓ∞ ball (a lower
    bound on the true maximum)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    s = states.double()
    net = net.double()
    mu = net(s).detach().unsqueeze(1)
    x = s.unsqueeze(1) + eps * (torch.rand(s.shape[0], restarts, s.shape[1], generator=g, dtype=torch.double) * 2 - 1)
    best = torch.zeros(s.shape[0], dtype=torch.double)
    for t in range(steps + 1):
        x = x.detach().requires_grad_(True)
        dist = (net(x) - mu).pow(2).sum(-1).clamp_min(1e-30).sqrt()
        best = torch.maximum(best, dist.detach().max(1).values)
        if t == steps:
            break
        (grad,) = torch.autograd.grad(dist.sum(), x)
        step = eps * (0.25 if t < steps // 2 else 0.05)
        with torch.no_grad():
            x = s.unsqueeze(1) + (x + step * grad.sign() - s.unsqueeze(1)).clamp(-eps, eps)
    net.float()
    return best


def measure_run(run_dir: Path, n_states: int, num_envs: int, attack_states: int) -> dict:
    import torch
    import yaml

    from prunerl.certify import certified_deviation, certified_tv, distribution
    from prunerl.checkpoint import actor_from_checkpoint, load_checkpoint
    from prunerl.evaluation import collect_transitions
    from prunerl.lipschitz import gaussian_c, input_jacobians, lipschitz_surrogate

    cfg_file = yaml.safe_load((run_dir / "config.yaml").read_text())
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    actor, norm_state, cfg = actor_from_checkpoint(ckpt)
    actor.eval()
    eps = float(cfg_file["env"]["eps"])
    task = cfg_file["env"]["name"]
    t0 = time.perf_counter()
    states = collect_transitions(actor, norm_state, task, n_states, num_envs=num_envs,
                                 deterministic=True)["observation"].float()
    rollout_s = time.perf_counter() - t0
    net = actor.mean_net
    c = gaussian_c(actor.std)
    lt_inf = lipschitz_surrogate(net, ball="linf")
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    row = {
        "run": run_dir.name, "kappa": float(cfg_file["algo"]["kappa"]), "seed": int(cfg_file["seed"]),
        "final_sparsity": float(cfg_file["pruning"]["final_sparsity"]) if cfg_file["pruning"]["criterion"] != "none" else 0.0,
        "pruning": cfg_file["pruning"]["criterion"], "actor_weight_sparsity": zeros / total,
        "eps": eps, "states": int(states.shape[0]), "sigma_min": float(actor.std.detach().min()), "c": c,
        "surrogate_linf": lt_inf, "global_dmu": lt_inf * eps, "global_tv": c * lt_inf * eps,
        "rollout_s": rollout_s,
    }
    for method in ("ibp", "crown"):
        t0 = time.perf_counter()
        dev = certified_deviation(net, states, eps, method)
        row[f"{method}_s"] = time.perf_counter() - t0
        row[method] = {"dmu": distribution(dev), "tv": distribution(certified_tv(dev, c), THRESHOLD)}
        row[f"{method}_global_over_median"] = row["global_dmu"] / row[method]["dmu"]["median"]
    # first-order context: ε·‖|J(s)|𝟙‖₂ (no curvature term, not a bound)
    j = input_jacobians(net.double(), states.double()).abs().sum(-1).pow(2).sum(-1).sqrt() * eps
    net.float()
    row["first_order"] = distribution(j)
    sub = states[:: max(1, states.shape[0] // attack_states)][:attack_states]
    reach = pgd_reach(net, sub, eps)
    crown_sub = certified_deviation(net, sub, eps, "crown")
    row["attack"] = {"states": int(sub.shape[0]), "dmu": distribution(reach),
                     "crown_over_attack_median": float((crown_sub / reach.clamp_min(1e-30)).median()),
                     "sound": bool((reach <= crown_sub * (1 + 1e-9) + 1e-12).all())}
    return row


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (κ, sparsity): the mean over seeds of each run's medians (and the seeds' range)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kappa"], r["final_sparsity"])].append(r)
    out = []
    for (k, sp), rs in sorted(groups.items()):
        def col(f):
            v = [f(r) for r in rs]
            return {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}
        out.append({
            "kappa": k, "final_sparsity": sp, "seeds": sorted(r["seed"] for r in rs),
            "global_dmu": col(lambda r: r["global_dmu"]),
            "ibp_median_dmu": col(lambda r: r["ibp"]["dmu"]["median"]),
            "crown_median_dmu": col(lambda r: r["crown"]["dmu"]["median"]),
            "crown_p95_dmu": col(lambda r: r["crown"]["dmu"]["p95"]),
            "attack_median_dmu": col(lambda r: r["attack"]["dmu"]["median"]),
            "crown_median_tv": col(lambda r: r["crown"]["tv"]["median"]),
            "crown_certified_frac": col(lambda r: r["crown"]["tv"]["frac_below"]),
            "global_over_crown_median": col(lambda r: r["crown_global_over_median"]),
            "global_over_ibp_median": col(lambda r: r["ibp_global_over_median"]),
        })
    return out


def plot(agg: list[dict], path: Path, eps: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    kappas = sorted({a["kappa"] for a in agg})
    for i, k in enumerate(kappas):
        pts = [a for a in agg if a["kappa"] == k]
        x = [100 * a["final_sparsity"] for a in pts]
        for key, name, ls in (("global_dmu", "global L̃_∞·ε", ":"), ("ibp_median_dmu", "IBP median", "--"),
                              ("crown_median_dmu", "CROWN median", "-"),
                              ("attack_median_dmu", "attack reaches (median)", "-.")):
            y = [a[key]["mean"] for a in pts]
            lo, hi = [a[key]["min"] for a in pts], [a[key]["max"] for a in pts]
            (line,) = axes[0].plot(x, y, ls=ls, marker="o", color=f"C{i}", label=f"κ={k:g}: {name}")
            axes[0].fill_between(x, lo, hi, color=line.get_color(), alpha=0.12)
        for key, name, ls in (("global_over_ibp_median", "global / IBP median", "--"),
                              ("global_over_crown_median", "global / CROWN median", "-")):
            axes[1].plot(x, [a[key]["mean"] for a in pts], ls=ls, marker="o", color=f"C{i}", label=f"κ={k:g}: {name}")
    axes[0].set(xlabel="final sparsity (%)", ylabel=f"max over the ℓ∞ ball (ε={eps:g}) of ‖μ(ŝ)−μ(s)‖₂", yscale="log",
                title="Hopper: per-state (median over visited states) vs global")
    axes[1].axhline(100, color="grey", lw=0.8, ls=":")
    axes[1].set(xlabel="final sparsity (%)", ylabel="global bound / median per-state bound", yscale="log",
                title="how much tighter (goal: ≥ 100×)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.suptitle("mean over seeds (bands: seeds' range)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (each with config.yaml and checkpoints/last.ckpt)")
    p.add_argument("--states", type=int, default=2000, help="visited states per run (deterministic policy)")
    p.add_argument("--num-envs", type=int, default=2, help="envs stepped together (few: long episodes)")
    p.add_argument("--attack-states", type=int, default=200, help="states the attack is run on")
    p.add_argument("--out", default="benchmarks/results/certificates_hopper.json")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    load0 = load_average()
    rows = []
    for d in args.runs:
        t0 = time.perf_counter()
        row = measure_run(Path(d), args.states, args.num_envs, args.attack_states)
        rows.append(row)
        print(f"{row['run']}: global {row['global_dmu']:.3g}, IBP median {row['ibp']['dmu']['median']:.3g}, "
              f"CROWN median {row['crown']['dmu']['median']:.3g} ({row['crown_global_over_median']:.0f}× tighter), "
              f"attack median {row['attack']['dmu']['median']:.3g} [{time.perf_counter() - t0:.0f} s]", flush=True)
    agg = aggregate(rows)
    out = Path(args.out)
    png = out.with_suffix(".png")
    plot(agg, png, rows[0]["eps"])
    crown_factor = [r["crown_global_over_median"] for r in rows]
    result = {
        "what": "per-state IBP/CROWN bounds on max over the ℓ∞ ball of ‖μ(ŝ)−μ(s)‖₂ vs the global L̃_∞·ε",
        "command": "python benchmarks/certificates.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "threshold_tv": THRESHOLD,
        "goal": "median per-state bound ≥ 100× tighter than the global one",
        "goal_met_crown": {"all_runs": all(f >= 100 for f in crown_factor), "min_factor": min(crown_factor),
                           "max_factor": max(crown_factor)},
        "goal_met_ibp": {"all_runs": all(r["ibp_global_over_median"] >= 100 for r in rows),
                         "min_factor": min(r["ibp_global_over_median"] for r in rows),
                         "max_factor": max(r["ibp_global_over_median"] for r in rows)},
        "all_attacks_below_crown": all(r["attack"]["sound"] for r in rows),
        "by_kappa_and_sparsity": agg, "runs": rows, "figure": str(png),
        "machine": machine_info(), "load_average_before": load0, "load_average_after": load_average(),
    }
    write_json(out, result)
    print(f"wrote {out} and {png}")
    return result


if __name__ == "__main__":
    main()
