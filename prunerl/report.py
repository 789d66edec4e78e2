"""``python -m prunerl report runs=DIR out=DIR``: from a folder of run directories to the paper's
sweet-spot tables (Tables 2 and 3), figures (Figs. 2–5, L̃ and the certified bound vs sparsity),
a CSV of the aggregated numbers and a markdown summary. Works offline from the run directory
contract (config.yaml + summary.json); no W&B needed.

Definitions (Sec. 4.4–4.5, App. C), per task, method, κ and pruning interval:

- the *baseline* is the unpruned run (``pruning=none`` or final sparsity 0) of the same task and
  κ; every method's curve starts from it at sparsity 0;
- normalised clean(s) = mean_seeds clean(s) / mean_seeds clean(baseline);
- normalised robust(s) = mean over attacks a of mean_seeds R_a(s) / mean_seeds R_a(baseline);
- robust (worst)(s) = min_a mean_seeds R_a(s) / min_a mean_seeds R_a(baseline) — the worst attack's
  return, normalised by the baseline's worst attack;
- the *sweet spot* is the sparsity maximising (normalised clean + normalised robust) / 2;
- Table 3: for each attack a, its sweet spot s_a maximises the seed-mean R_a; the worst-seed R_a
  at s_a is averaged over attacks (absolute, and normalised by the baseline's seed-mean R_a);
  the reported sparsity is the mode of the s_a (ties favour the smaller).

Standard errors are across seeds (std / sqrt(n), 0 for a single seed).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from prunerl.rundir import read_summary

UNPRUNED = "none"


@dataclass
class Run:
    path: Path
    task: str
    method: str
    sparsity: float
    kappa: float
    seed: int
    interval: int | None
    clean: float | None
    attacks: dict[str, float]
    lipschitz: float | None
    bound: float | None
    actual_sparsity: float | None

    @property
    def group(self) -> tuple[str, float]:
        return self.task, self.kappa


@dataclass
class RunSet:
    runs: list[Run] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (run dir, what is wrong)


def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def read_runs(root: str | Path) -> RunSet:
    """Every run directory under ``root`` (a folder with a ``config.yaml``). Runs without a
    readable ``summary.json`` (failed or unfinished) are listed in ``problems``, not dropped."""
    root = Path(root)
    out = RunSet()
    for cfg_path in sorted(root.rglob("config.yaml")):
        run_dir = cfg_path.parent
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            out.problems.append((str(run_dir), f"config.yaml is not valid YAML ({e})"))
            continue
        if not (run_dir / "summary.json").exists():
            out.problems.append((str(run_dir), "no summary.json (the run failed or has not finished)"))
            continue
        try:
            s = read_summary(run_dir)
        except (OSError, json.JSONDecodeError) as e:
            out.problems.append((str(run_dir), f"summary.json is unreadable ({e})"))
            continue
        method = s.get("pruning_method") or _get(cfg, "pruning", "criterion", default=UNPRUNED)
        sparsity = float(s.get("final_sparsity") or _get(cfg, "pruning", "final_sparsity", default=0.0) or 0.0)
        if method == UNPRUNED:
            sparsity = 0.0
        attacks = {k: float(v) for k, v in (s.get("attack_returns") or {}).items() if v is not None}
        out.runs.append(Run(
            path=run_dir,
            task=s.get("env") or _get(cfg, "env", "name", default="?"),
            method=method,
            sparsity=round(sparsity, 6),
            kappa=float(s.get("kappa", _get(cfg, "algo", "kappa", default=0.0))),
            seed=int(s.get("seed", _get(cfg, "seed", default=0))),
            interval=_get(cfg, "pruning", "interval"),
            clean=s.get("clean_return"),
            attacks=attacks,
            lipschitz=_lipschitz_value(s.get("lipschitz_surrogate")),
            bound=_lipschitz_value(s.get("certified_bound")),
            actual_sparsity=_get(s, "sparsity", "global"),
        ))
        if s.get("clean_return") is None:
            out.problems.append((str(run_dir), "summary.json has no clean_return (evaluation did not run)"))
    return out


def _lipschitz_value(v):
    """summary.json may hold a number or a mapping (e.g. {"actor": .., "critic": ..}); the actor's
    figure is the one the certified bound uses."""
    if isinstance(v, dict):
        v = v.get("actor", next(iter(v.values()), None))
    return None if v is None else float(v)


def _mean_se(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    a = np.asarray(xs, dtype=float)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0
    return float(a.mean()), se


@dataclass
class Point:
    """One (task, κ, method, interval, sparsity) cell, aggregated over seeds."""

    task: str
    kappa: float
    method: str
    interval: int | None
    sparsity: float
    seeds: list[int]
    clean: tuple[float, float]
    attacks: dict[str, tuple[float, float]]
    attack_seeds: dict[str, list[float]]
    lipschitz: tuple[float, float]
    bound: tuple[float, float]
    norm_clean: float = float("nan")
    norm_robust: float = float("nan")
    norm_robust_se: float = float("nan")
    robust_worst: float = float("nan")
    norm_attacks: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return (self.norm_clean + self.norm_robust) / 2


def aggregate(runs: list[Run]) -> list[Point]:
    """Seed-aggregated points, normalised to the unpruned baseline of the same task and κ.

    The baseline point is added to every method's curve at sparsity 0."""
    cells: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        cells[(r.task, r.kappa, r.method, r.interval if r.method != UNPRUNED else None, r.sparsity)].append(r)
    points = []
    for (task, kappa, method, interval, sparsity), rs in sorted(cells.items(), key=lambda kv: str(kv[0])):
        names = sorted({a for r in rs for a in r.attacks})
        points.append(Point(
            task=task, kappa=kappa, method=method, interval=interval, sparsity=sparsity,
            seeds=sorted(r.seed for r in rs),
            clean=_mean_se([r.clean for r in rs]),
            attacks={a: _mean_se([r.attacks.get(a) for r in rs]) for a in names},
            attack_seeds={a: [r.attacks[a] for r in rs if a in r.attacks] for a in names},
            lipschitz=_mean_se([r.lipschitz for r in rs]),
            bound=_mean_se([r.bound for r in rs]),
        ))
    baselines = {(p.task, p.kappa): p for p in points if p.method == UNPRUNED or p.sparsity == 0}
    for p in points:
        base = baselines.get((p.task, p.kappa))
        if base is None:
            continue
        p.norm_clean = p.clean[0] / base.clean[0] if base.clean[0] else float("nan")
        p.norm_attacks = {a: p.attacks[a][0] / base.attacks[a][0]
                          for a in p.attacks if a in base.attacks and base.attacks[a][0]}
        if p.norm_attacks:
            p.norm_robust = float(np.mean(list(p.norm_attacks.values())))
            # SE of the normalised robust figure: the seeds' own averages over attacks
            per_seed = [np.mean([p.attack_seeds[a][i] / base.attacks[a][0] for a in p.norm_attacks])
                        for i in range(min(len(p.attack_seeds[a]) for a in p.norm_attacks))]
            p.norm_robust_se = _mean_se(per_seed)[1]
            shared = [a for a in p.attacks if a in base.attacks]
            worst_base = min(base.attacks[a][0] for a in shared)
            p.robust_worst = min(p.attacks[a][0] for a in shared) / worst_base if worst_base else float("nan")
    return points


def curves(points: list[Point]) -> dict[tuple, list[Point]]:
    """(task, κ, method, interval) -> points by sparsity, each starting at the baseline."""
    out: dict[tuple, list[Point]] = defaultdict(list)
    base = {(p.task, p.kappa): p for p in points if p.method == UNPRUNED or p.sparsity == 0}
    for p in points:
        if p.method == UNPRUNED or p.sparsity == 0:
            continue
        out[(p.task, p.kappa, p.method, p.interval)].append(p)
    for key, ps in out.items():
        b = base.get(key[:2])
        if b is not None:
            ps.append(b)
        ps.sort(key=lambda p: p.sparsity)
    return dict(out)


def sweet_spots(points: list[Point]) -> list[dict]:
    """Table 2: per task, κ, method (and interval): the sweet-spot sparsity and its figures."""
    rows = []
    for (task, kappa, method, interval), ps in sorted(curves(points).items(), key=lambda kv: str(kv[0])):
        scored = [p for p in ps if math.isfinite(p.score)]
        if not scored:
            continue
        best = max(scored, key=lambda p: (p.score, -p.sparsity))  # ties favour the smaller sparsity
        rows.append({"env": task, "kappa": kappa, "method": method, "interval": interval,
                     "sweet_spot": best.sparsity, "clean": best.norm_clean,
                     "robust_worst": best.robust_worst, "norm_robust_avg": best.norm_robust,
                     "score": best.score, "seeds": len(best.seeds)})
    return rows


def worst_seed_table(points: list[Point]) -> list[dict]:
    """Table 3: worst-seed robustness at each attack's own sweet spot, averaged over attacks."""
    rows = []
    base = {(p.task, p.kappa): p for p in points if p.method == UNPRUNED or p.sparsity == 0}
    for (task, kappa, method, interval), ps in sorted(curves(points).items(), key=lambda kv: str(kv[0])):
        b = base.get((task, kappa))
        attacks = sorted({a for p in ps for a in p.attacks})
        if not attacks or b is None:
            continue
        spots, worst_abs, worst_norm = [], [], []
        for a in attacks:
            have = [p for p in ps if a in p.attacks]
            best = max(have, key=lambda p: (p.attacks[a][0], -p.sparsity))
            spots.append(best.sparsity)
            worst = min(best.attack_seeds[a])
            worst_abs.append(worst)
            if a in b.attacks and b.attacks[a][0]:
                worst_norm.append(worst / b.attacks[a][0])
        counts = defaultdict(int)
        for s in spots:
            counts[s] += 1
        mode = min(counts, key=lambda s: (-counts[s], s))
        rows.append({"env": task, "kappa": kappa, "method": method, "interval": interval,
                     "pruning": mode, "worst_seed_abs": float(np.mean(worst_abs)),
                     "worst_seed_norm": float(np.mean(worst_norm)) if worst_norm else float("nan")})
    return rows


# -- output ------------------------------------------------------------------------------------
def _fmt(x, pct=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if pct:
        return f"{100 * x:.0f}%"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _markdown_table(rows: list[dict], cols: list[tuple[str, str, bool]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n"
    return head + "".join("| " + " | ".join(_fmt(r[c[0]], c[2]) for c in cols) + " |\n" for r in rows)


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _aggregated_rows(points: list[Point]) -> list[dict]:
    rows = []
    for p in points:
        row = {"env": p.task, "kappa": p.kappa, "method": p.method, "interval": p.interval,
               "sparsity": p.sparsity, "seeds": len(p.seeds), "clean_mean": p.clean[0],
               "clean_se": p.clean[1], "norm_clean": p.norm_clean, "norm_robust_avg": p.norm_robust,
               "robust_worst": p.robust_worst, "lipschitz_mean": p.lipschitz[0],
               "lipschitz_se": p.lipschitz[1], "bound_mean": p.bound[0], "bound_se": p.bound[1]}
        for a, (m, se) in p.attacks.items():
            row[f"{a}_mean"], row[f"{a}_se"] = m, se
        rows.append(row)
    return rows


def _label(method, interval, kappa=None):
    s = method if interval is None else f"{method} (Δt={interval})"
    return s if kappa is None else f"{s}, κ={kappa:g}"


def make_figures(points: list[Point], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    cs = curves(points)
    tasks = sorted({k[0] for k in cs})

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    def band(ax, xs, ys, ses, **kw):
        ys, ses = np.asarray(ys, float), np.asarray(ses, float)
        (line,) = ax.plot(xs, ys, marker="o", **kw)
        ax.fill_between(xs, ys - ses, ys + ses, alpha=0.2, color=line.get_color())

    for task in tasks:
        keys = [k for k in cs if k[0] == task]
        kappas = sorted({k[1] for k in keys})
        main_k = max(kappas)  # the SA-trained setting when there is one (the paper's baseline)
        # Fig. 2: normalised clean and robust vs sparsity, per method
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        for k in sorted(keys, key=str):
            if k[1] != main_k:
                continue
            ps = cs[k]
            x = [100 * p.sparsity for p in ps]
            band(axes[0], x, [p.norm_clean for p in ps], [p.clean[1] / ps[0].clean[0] if ps[0].clean[0] else 0 for p in ps],
                 label=_label(k[2], k[3]))
            band(axes[1], x, [p.norm_robust for p in ps], [p.norm_robust_se for p in ps], label=_label(k[2], k[3]))
        for ax, t in zip(axes, ("normalised clean return", "normalised robust return (avg over attacks)")):
            ax.set(xlabel="sparsity (%)", ylabel=t, title=f"{task} (κ={main_k:g})")
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        save(fig, f"fig2_frontier_{task}.png")

        # Fig. 3: per attack, return vs sparsity, per method
        attacks = sorted({a for k in keys for p in cs[k] for a in p.attacks})
        panels = ["clean", *attacks]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
        for ax, a in zip(axes[0], panels):
            for k in sorted(keys, key=str):
                if k[1] != main_k:
                    continue
                ps = [p for p in cs[k] if a == "clean" or a in p.attacks]
                vals = [p.clean if a == "clean" else p.attacks[a] for p in ps]
                band(ax, [100 * p.sparsity for p in ps], [v[0] for v in vals], [v[1] for v in vals],
                     label=_label(k[2], k[3]))
            ax.set(xlabel="sparsity (%)", ylabel="return", title=f"{task}: {a}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        save(fig, f"fig3_attacks_{task}.png")

        # Fig. 4: with and without SA (κ = 0 vs κ > 0), per attack
        if len(kappas) > 1:
            fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
            for ax, a in zip(axes[0], panels):
                for k in sorted(keys, key=str):
                    ps = [p for p in cs[k] if a == "clean" or a in p.attacks]
                    vals = [p.clean if a == "clean" else p.attacks[a] for p in ps]
                    band(ax, [100 * p.sparsity for p in ps], [v[0] for v in vals], [v[1] for v in vals],
                         label=_label(k[2], k[3], k[1]), ls="-" if k[1] > 0 else "--")
                ax.set(xlabel="sparsity (%)", ylabel="return", title=f"{task}: {a}, with/without SA")
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=7)
            save(fig, f"fig4_sa_{task}.png")

        # Fig. 5: micro-pruning interval ablation (methods with several intervals)
        by_method = defaultdict(set)
        for k in keys:
            by_method[(k[1], k[2])].add(k[3])
        ablated = [(kk, m) for (kk, m), ivs in by_method.items() if len(ivs) > 1]
        if ablated:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for kk, m in ablated:
                for iv in sorted(by_method[(kk, m)], key=lambda v: (v is None, v)):
                    ps = cs[(task, kk, m, iv)]
                    x = [100 * p.sparsity for p in ps]
                    lab = f"{m}, " + ("one-shot" if iv == 0 else f"every {iv} updates")
                    band(axes[0], x, [p.norm_clean for p in ps], [0] * len(ps), label=lab)
                    band(axes[1], x, [p.norm_robust for p in ps], [p.norm_robust_se for p in ps], label=lab)
            for ax, t in zip(axes, ("normalised clean", "normalised robust (avg)")):
                ax.set(xlabel="sparsity (%)", ylabel=t, title=f"{task}: mask-update interval")
                ax.grid(alpha=0.3)
            axes[0].legend(fontsize=8)
            save(fig, f"fig5_interval_{task}.png")

        # L̃ and the certified bound vs sparsity
        if any(math.isfinite(p.lipschitz[0]) for k in keys for p in cs[k]):
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for k in sorted(keys, key=str):
                ps = cs[k]
                x = [100 * p.sparsity for p in ps]
                band(axes[0], x, [p.lipschitz[0] for p in ps], [p.lipschitz[1] for p in ps], label=_label(k[2], k[3], k[1]))
                band(axes[1], x, [p.bound[0] for p in ps], [p.bound[1] for p in ps], label=_label(k[2], k[3], k[1]))
            axes[0].set(xlabel="sparsity (%)", ylabel="L̃ (Thm. 1 surrogate)", yscale="log", title=f"{task}: Lipschitz surrogate")
            axes[1].set(xlabel="sparsity (%)", ylabel="α·c·L̃·ε", yscale="log", title=f"{task}: certified bound")
            for ax in axes:
                ax.grid(alpha=0.3)
            axes[0].legend(fontsize=7)
            save(fig, f"lipschitz_{task}.png")
    return files


def report(runs_dir: str | Path, out_dir: str | Path) -> dict:
    """Read ``runs_dir``, write tables, CSV, figures and ``summary.md`` to ``out_dir``."""
    runs_dir, out = Path(runs_dir), Path(out_dir)
    rs = read_runs(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = aggregate(rs.runs)
    t2 = sweet_spots(points)
    t3 = worst_seed_table(points)
    _write_csv(out / "aggregated.csv", _aggregated_rows(points))
    _write_csv(out / "table2_sweet_spots.csv", t2)
    _write_csv(out / "table3_worst_seed.csv", t3)
    figs = make_figures(points, out)
    t2_md = _markdown_table(t2, [("env", "Environment", False), ("kappa", "κ", False), ("method", "Method", False),
                                 ("interval", "Interval", False), ("sweet_spot", "Sweet-spot %", True),
                                 ("clean", "Clean", False), ("robust_worst", "Robust (worst)", False),
                                 ("norm_robust_avg", "Norm. robust (avg)", False), ("seeds", "Seeds", False)])
    t3_md = _markdown_table(t3, [("env", "Environment", False), ("kappa", "κ", False), ("method", "Method", False),
                                 ("interval", "Interval", False), ("pruning", "Pruning %", True),
                                 ("worst_seed_abs", "Avg. worst-seed abs", False),
                                 ("worst_seed_norm", "Avg. worst-seed norm", False)])
    (out / "table2_sweet_spots.md").write_text(t2_md)
    (out / "table3_worst_seed.md").write_text(t3_md)
    lines = [f"# PruneRL report: `{runs_dir}`", "",
             f"{len(rs.runs)} runs read; {len(rs.problems)} problems.", "",
             "Returns are normalised to the unpruned run of the same task and κ; the sweet spot",
             "maximises (normalised clean + normalised robust) / 2 (see `prunerl/report.py`).", "",
             "## Table 2 — sweet spots", "", t2_md, "", "## Table 3 — worst-seed robustness", "", t3_md, "",
             "## Figures", ""]
    lines += [f"![{f.stem}]({f.name})" for f in figs]
    lines += ["", "## Data", "", "- [aggregated.csv](aggregated.csv) — every (task, κ, method, interval, sparsity) cell",
              "- [table2_sweet_spots.csv](table2_sweet_spots.csv), [table3_worst_seed.csv](table3_worst_seed.csv)", ""]
    if rs.problems:
        lines += ["## Missing or failed runs", ""] + [f"- `{p}`: {why}" for p, why in rs.problems] + [""]
    (out / "summary.md").write_text("\n".join(lines))
    return {"runs": len(rs.runs), "problems": rs.problems, "table2": t2, "table3": t3,
            "figures": [str(f) for f in figs], "out": str(out)}
