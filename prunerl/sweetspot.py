"""The report's statistics: from runs of one setting to curves, sweet spots (Table 2), worst-seed
robustness (Table 3), confidence intervals over seeds and a verdict. Pure maths on the figures
``summary.json`` holds; :mod:`prunerl.report` writes them out.

Which runs count, and which may be compared, is :mod:`prunerl.runset`'s job (duplicates counted
once, learned adversaries skipped, runs with a different ε, budget, evaluation mode or episodes
reported as separate settings). Within one setting, per κ, method and pruning variant (interval):

- a *curve* runs over the method's sparsities; its 0% point is the dense ``pruning=none`` run of
  the same κ, or, when the sweep has none, the method's own 0% run (the tables say which);
- the *baseline* every curve is normalised to is, by default (``normalize=sa``), the unpruned
  SA-trained policy (Sec. 4.5: "all reported results are normalized against the unpruned
  SA-trained network", κ = 0 included): the dense run of ``baseline_kappa``, by default the
  smallest κ > 0 of the setting. ``normalize=same_kappa`` normalises each κ to its own dense run.
  The baseline is the ``pruning=none`` run when there is one, else the method's own 0% run;
- per seed, the *worst-attack return* is the lowest of that run's attack returns (the attack an
  adversary who knows the policy would pick);
- normalised clean(s) = mean_seeds clean(s) / mean_seeds clean(baseline);
- normalised robust (avg)(s) = mean over attacks a of mean_seeds R_a(s) / mean_seeds R_a(baseline);
- robust (worst)(s) = mean_seeds worst(s) / mean_seeds worst(baseline) (Table 2's "Robust (Worst)",
  normalised like every figure of that table);
- the *sweet spot* is the sparsity maximising score = (normalised clean + normalised robust
  (avg)) / 2 (Sec. 4.4); ties favour the smaller sparsity;
- Table 3: for each attack a, its sweet spot s_a maximises the seed-mean R_a; the worst-seed R_a at
  s_a is averaged over attacks (absolute, and normalised by the baseline's seed-mean R_a); the
  reported sparsity is the mode of the s_a (ties favour the smaller).

Every figure carries a confidence interval over seeds (95% by default): a bootstrap that resamples
each cell's seeds with replacement (each cell — one κ, method, variant and sparsity — on its own,
the baseline's too), recomputes every derived figure (ratios, Table 3's per-attack choices) on each
of ``resamples`` replicates, and takes the *expanded* percentile interval (:func:`expanded_tail`):
with 3–10 seeds the plain percentile interval is far too narrow. The generator is seeded per cell,
so a report is deterministic. A figure that rests on a cell with a single seed has no CI. Values
*at the sweet spot* are the values at that sparsity (its choice is not re-made per replicate); how
often the replicates pick the same sparsity is reported as the sweet spot's share.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from prunerl.runset import CERTIFICATE_FIGURES, UNPRUNED, Run, Setting

NORMALIZE = ("sa", "same_kappa")

# The paper's Table 2 (App. C; SA-trained, normalised to the unpruned SA-trained policy):
# (task, method) -> (sweet-spot sparsity, clean, robust (worst), norm. robust (avg)).
PAPER_TABLE2 = {
    ("hopper", "magnitude"): (0.30, 1.00, 1.63, 1.26),
    ("hopper", "magnitude_ste"): (0.90, 0.95, 1.53, 1.22),
    ("hopper", "random"): (0.90, 1.00, 1.51, 1.33),
    ("hopper", "saliency"): (0.85, 1.00, 1.66, 1.28),
    ("walker2d", "magnitude"): (0.70, 1.33, 1.09, 1.24),
    ("walker2d", "magnitude_ste"): (0.70, 0.90, 0.81, 0.90),
    ("walker2d", "random"): (0.30, 1.29, 1.43, 1.37),
    ("walker2d", "saliency"): (0.30, 1.20, 0.94, 1.13),
    ("halfcheetah", "magnitude"): (0.90, 1.02, 1.24, 1.23),
    ("halfcheetah", "magnitude_ste"): (0.50, 1.01, 1.47, 1.28),
    ("halfcheetah", "random"): (0.85, 0.90, 1.62, 1.35),
    ("halfcheetah", "saliency"): (0.85, 0.99, 1.37, 1.26),
}
CLEAN_FLOOR = 0.95  # "maintaining at least 95% of baseline clean performance" (Sec. 1)
# Below this a bootstrap CI cannot be wider than the seeds' own range: simulated coverage of the
# nominal 95% interval (normal data through ci()) was 76% for a mean / ~90% for a ratio at 3 seeds,
# 92% / 97% at 5, 95% / 97% at 10 — so a verdict needs 5.
VERDICT_MIN_SEEDS = 5


# -- cells: one (κ, method, variant, sparsity), its seeds and their bootstrap ------------------
@dataclass
class Cell:
    kappa: float
    method: str
    variant: tuple
    sparsity: float
    runs: list[Run]
    mean: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (1+B,): [point, replicates...]
    low: dict[str, np.ndarray] = field(default_factory=dict)   # column -> (1+B,): minimum over the seeds

    @property
    def key(self) -> tuple:
        return self.kappa, self.method, self.variant, self.sparsity

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


def _columns(attacks: list[str]) -> list[str]:
    return ["clean", *(f"attack:{a}" for a in attacks), "worst", "avg_attack", "lipschitz", "bound",
            "actual_sparsity", *CERTIFICATE_FIGURES]


def _values(run: Run, mode: str, attacks: list[str]) -> list[float]:
    ev = run.evaluations[mode]
    atk = [ev.attacks.get(a, math.nan) for a in attacks]
    worst = min(atk) if atk and all(math.isfinite(x) for x in atk) else math.nan
    avg = float(np.mean(atk)) if atk else math.nan
    f = lambda x: math.nan if x is None else float(x)  # noqa: E731
    return [ev.clean, *atk, worst, avg, f(run.lipschitz), f(run.bound), f(run.actual_sparsity),
            *(f(run.certificates.get(k)) for k in CERTIFICATE_FIGURES)]


def _bootstrap(cell: Cell, mode: str, attacks: list[str], resamples: int, seed: int) -> None:
    """Fill ``cell.mean`` and ``cell.low``: row 0 from all seeds, rows 1.. from seed resamples."""
    cols = _columns(attacks)
    v = np.asarray([_values(r, mode, attacks) for r in cell.runs], dtype=float)  # (n, k)
    n = len(v)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (no L̃ recorded) stay NaN
        point_mean, point_low = np.nanmean(v, axis=0), np.nanmin(v, axis=0)
        if n >= 2 and resamples > 0:
            rng = np.random.default_rng([seed, zlib.crc32(repr(cell.key).encode())])
            rs = v[rng.integers(0, n, size=(resamples, n))]  # (B, n, k)
            rep_mean, rep_low = np.nanmean(rs, axis=1), np.nanmin(rs, axis=1)
        else:  # one seed: no spread to resample
            rep_mean = rep_low = np.full((resamples, len(cols)), np.nan)
    for j, c in enumerate(cols):
        cell.mean[c] = np.concatenate([[point_mean[j]], rep_mean[:, j]])
        cell.low[c] = np.concatenate([[point_low[j]], rep_low[:, j]])


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        out = a / b
    return np.where(b == 0, np.nan, out)


def _t_quantile(p: float, df: int) -> float:
    """Student's t quantile (p > 0.5) by bisection on its CDF (Simpson's rule on the density)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x):
        xs = np.linspace(0.0, x, 2049)
        f = c * (1 + xs ** 2 / df) ** (-(df + 1) / 2)
        return 0.5 + (xs[1] - xs[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1e3
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@lru_cache(maxsize=None)
def expanded_tail(n: int, level: float) -> float:
    """The lower tail probability of the *expanded* percentile interval (Hesterberg 2015, "What teachers
    should know about the bootstrap", Sec. 5.4): the plain percentile bootstrap of a mean is too narrow
    for small n (it behaves like mean ± z·s/√n with a biased s); using the quantiles at
    Φ(−√(n/(n−1))·t_{n−1}) instead of α/2 widens it towards a t interval. It cannot reach beyond the
    resampled values, though: at n = 3 it stays far narrower than a t interval (measured coverage 76%
    for a mean), at n = 5 it covers ~92%, at 10 ~95% (VERDICT_MIN_SEEDS). n = 5 at 95%: 0.1% / 99.9%."""
    t = _t_quantile(1 - (1 - level) / 2, n - 1)
    return NormalDist().cdf(-math.sqrt(n / (n - 1)) * t)


def ci(x: np.ndarray, level: float, n: int) -> tuple[float, float]:
    """Expanded percentile interval of the replicates (rows 1..) for a figure resting on cells of at
    least ``n`` seeds; NaN when n < 2 or any replicate is undefined."""
    reps = np.asarray(x[1:], dtype=float)
    if n < 2 or reps.size == 0 or not np.all(np.isfinite(reps)):
        return math.nan, math.nan
    q = 100 * expanded_tail(n, level)
    lo, hi = np.percentile(reps, [q, 100 - q])
    return float(lo), float(hi)


# -- points and curves ---------------------------------------------------------------------------
@dataclass
class Point:
    cell: Cell
    ref: Cell | None
    stats: dict[str, np.ndarray]  # figure -> (1+B,)

    @property
    def sparsity(self) -> float:
        return self.cell.sparsity

    def n_for(self, stat: str) -> int:
        """Seeds behind a figure: the cell's, or the fewer of the cell's and the baseline's for a
        normalised one."""
        n = len(self.cell.runs)
        if stat.startswith("norm") or stat == "score":
            n = min(n, len(self.ref.runs)) if self.ref is not None else 0
        return n


def _point(cell: Cell, ref: Cell | None, attacks: list[str]) -> Point:
    m = cell.mean
    nan = np.full_like(m["clean"], np.nan)
    st = {"clean": m["clean"], "worst": m["worst"], "avg_attack": m["avg_attack"],
          "lipschitz": m["lipschitz"], "bound": m["bound"], "actual_sparsity": m["actual_sparsity"],
          **{k: m[k] for k in CERTIFICATE_FIGURES}}
    for a in attacks:
        st[f"attack:{a}"] = m[f"attack:{a}"]
    if ref is None:
        st.update(norm_clean=nan, norm_worst=nan, norm_avg=nan, score=nan)
        for a in attacks:
            st[f"norm:{a}"] = nan
        return Point(cell, ref, st)
    st["norm_clean"] = _ratio(m["clean"], ref.mean["clean"])
    norms = [_ratio(m[f"attack:{a}"], ref.mean[f"attack:{a}"]) for a in attacks]
    for a, x in zip(attacks, norms):
        st[f"norm:{a}"] = x
    st["norm_avg"] = np.mean(norms, axis=0) if norms else nan
    st["norm_worst"] = _ratio(m["worst"], ref.mean["worst"]) if attacks else nan
    st["score"] = (st["norm_clean"] + st["norm_avg"]) / 2
    return Point(cell, ref, st)


@dataclass
class Curve:
    kappa: float
    method: str
    variant: tuple
    points: list[Point]     # by sparsity; the first is the 0% point when there is one
    zero: str               # what the 0% point is: "pruning=none", "own 0%" or "none"
    ref: Cell | None
    ref_text: str           # e.g. "pruning=none, κ=0.3 (3 seeds)"


@dataclass
class Analysis:
    """One setting under one evaluation mode: its cells, curves and tables."""

    setting: Setting
    mode: str
    attacks: list[str]
    ref_kappa_rule: str
    cells: dict[tuple, Cell]
    curves: list[Curve]
    table2: list[dict]
    table3: list[dict]
    aggregated: list[dict]
    notes: list[str]
    level: float


def variant_labels(runs: list[Run]) -> dict[tuple, str]:
    """Interval (always) and any other pruning key that varies among the setting's pruned runs."""
    variants = {r.variant for r in runs if r.method != UNPRUNED}
    keys = [k for k in ("burn_in", "end", "allocation", "scope")
            if len({dict(v).get(k) for v in variants}) > 1]
    out = {(): ""}
    for v in variants:
        d = dict(v)
        iv = d.get("interval")
        parts = ["one-shot" if iv == 0 else _fmt_num(iv)] + [f"{k}={d.get(k)}" for k in keys]
        out[v] = ", ".join(parts)
    return out


def _fmt_num(x) -> str:
    return "–" if x is None else f"{x:g}" if isinstance(x, (int, float)) else str(x)


def analyse(setting: Setting, mode: str = "primary", *, normalize: str = "sa", baseline_kappa: float | None = None,
            resamples: int = 5000, level: float = 0.95, seed: int = 0) -> Analysis | None:
    runs = [r for r in setting.runs if mode in r.evaluations]
    if not runs:
        return None
    notes: list[str] = []
    attack_sets = [set(r.evaluations[mode].attacks) for r in runs]
    attacks = sorted(set.intersection(*attack_sets))
    extra = sorted(set.union(*attack_sets) - set(attacks))
    if extra:
        notes.append(f"attacks {extra} are missing from some runs: robust figures use {attacks} only")
    if not attacks:
        notes.append("no attack was run on every run: robust figures are undefined")

    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.kappa, r.method, r.variant, r.sparsity)].append(r)
    cells = {}
    for key, rs in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        cell = Cell(*key, runs=sorted(rs, key=lambda r: (r.seed, str(r.path))))
        seeds = cell.seeds
        if len(set(seeds)) < len(seeds):
            notes.append(f"κ={key[0]:g} {key[1]} {100 * key[3]:g}%: seeds {seeds} repeat with different "
                         "configs (check the setting); each run counts as one sample")
        _bootstrap(cell, mode, attacks, resamples, seed)
        cells[key] = cell

    kappas = sorted({k[0] for k in cells})
    if normalize == "same_kappa":
        ref_kappa = lambda k: k  # noqa: E731
        rule = "each κ normalised to its own unpruned run (normalize=same_kappa)"
    else:
        if baseline_kappa is not None:
            chosen = float(baseline_kappa)
            rule = f"every κ normalised to the unpruned run of κ={chosen:g} (baseline_kappa={chosen:g})"
        elif any(k > 0 for k in kappas):
            chosen = min(k for k in kappas if k > 0)
            rule = (f"every κ normalised to the unpruned SA-trained run, κ={chosen:g} (the smallest κ > 0 "
                    "present; Sec. 4.5)")
            if sum(k > 0 for k in kappas) > 1:
                rule += "; choose another with baseline_kappa="
        else:
            chosen = None
            rule = "no SA-trained (κ > 0) run in this setting: each κ normalised to its own unpruned run"
        ref_kappa = (lambda k: k) if chosen is None else (lambda k: chosen)  # noqa: E731

    def dense(k):
        return cells.get((k, UNPRUNED, (), 0.0))

    def ref_for(k, method, variant):
        rk = ref_kappa(k)
        d = dense(rk)
        if d is not None:
            return d, f"pruning=none, κ={rk:g} ({len(d.runs)} seeds)"
        own = cells.get((rk, method, variant, 0.0)) if method != UNPRUNED else None
        if own is not None:
            return own, f"{method} 0%, κ={rk:g} ({len(own.runs)} seeds; no pruning=none run)"
        return None, f"none: no unpruned run at κ={rk:g}"

    labels = variant_labels(runs)
    curves = []
    for (k, method, variant) in sorted({(c.kappa, c.method, c.variant) for c in cells.values()
                                        if c.method != UNPRUNED}, key=repr):
        ref, ref_text = ref_for(k, method, variant)
        if ref is None:
            notes.append(f"κ={k:g} {method}: no unpruned run to normalise to ({ref_text}); normalised figures are blank")
        members = [c for c in cells.values() if (c.kappa, c.method, c.variant) == (k, method, variant)]
        zero_cell, zero = dense(k), "pruning=none"
        if zero_cell is None:
            zero_cell = next((c for c in members if c.sparsity == 0), None)
            zero = "own 0%" if zero_cell is not None else "none"
        elif any(c.sparsity == 0 for c in members):
            notes.append(f"κ={k:g} {method} ({labels[variant]}): its own 0% runs are listed in aggregated.csv but "
                         "the curve's 0% point is the dense pruning=none run")
        pts = [c for c in members if c.sparsity > 0]
        if zero_cell is not None:
            pts.insert(0, zero_cell)
        pts.sort(key=lambda c: c.sparsity)
        curves.append(Curve(k, method, variant, [_point(c, ref, attacks) for c in pts], zero, ref, ref_text))

    a = Analysis(setting, mode, attacks, rule, cells, curves, [], [], [], notes, level)
    a.table2 = [_table2_row(a, cv, labels) for cv in curves]
    a.table3 = [row for cv in curves if (row := _table3_row(a, cv, labels)) is not None]
    a.aggregated = _aggregated_rows(a, ref_for, labels)
    return a


def _with_ci(row: dict, name: str, x: np.ndarray, level: float, n: int) -> None:
    row[name] = float(x[0])
    row[f"{name}_lo"], row[f"{name}_hi"] = ci(x, level, n)


def _argmax_rows(m: np.ndarray) -> np.ndarray:
    """Per column (replicate), the first (smallest-sparsity) row holding the maximum; -1 if none."""
    f = np.where(np.isfinite(m), m, -np.inf)
    idx = np.argmax(f, axis=0)
    return np.where(np.isfinite(m).any(axis=0), idx, -1)


def _head(a: Analysis, cv: Curve, labels) -> dict:
    h = a.setting.headline
    return {"setting": a.setting.id, "env": a.setting.task, "evaluation": mode_text(a),
            "eps": h["eps"], "frames": h["frames"], "episodes": h["episodes"], "kappa": cv.kappa,
            "method": cv.method, "interval": labels[cv.variant]}


def mode_text(a: Analysis) -> str:
    if a.mode == "stochastic":
        return "stochastic"
    return {True: "deterministic", False: "stochastic"}.get(a.setting.headline["deterministic"], "?")


def _table2_row(a: Analysis, cv: Curve, labels) -> dict:
    row = _head(a, cv, labels)
    scores = np.stack([p.stats["score"] for p in cv.points]) if cv.points else np.empty((0, 1))
    best = _argmax_rows(scores) if cv.points else np.array([-1])
    i = int(best[0])
    row["sweet_spot"] = cv.points[i].sparsity if i >= 0 else math.nan
    p = cv.points[i] if i >= 0 else None
    for name, stat in (("clean", "norm_clean"), ("robust_worst", "norm_worst"), ("norm_robust_avg", "norm_avg"),
                       ("score", "score"), ("clean_return", "clean"), ("worst_return", "worst")):
        if p is None:
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = math.nan, math.nan, math.nan
        else:
            _with_ci(row, name, p.stats[stat], a.level, p.n_for(stat))
    reps = best[1:]
    ok = reps.size > 0 and i >= 0 and all(np.all(np.isfinite(q.stats["score"][1:])) for q in cv.points)
    row["sweet_spot_share"] = float(np.mean(reps == i)) if ok else math.nan
    row["seeds"] = len(p.cell.runs) if p is not None else 0
    row["baseline_seeds"] = len(cv.ref.runs) if cv.ref is not None else 0
    row["baseline"] = cv.ref_text
    row["zero_point"] = cv.zero
    return row


def _table3_row(a: Analysis, cv: Curve, labels) -> dict | None:
    if not a.attacks or cv.ref is None or not cv.points:
        return None
    spots, abs_per, norm_per = [], [], []
    for atk in a.attacks:
        col = f"attack:{atk}"
        idx = _argmax_rows(np.stack([p.stats[col] for p in cv.points]))
        low = np.stack([p.cell.low[col] for p in cv.points])            # (P, 1+B)
        worst = low[idx, np.arange(low.shape[1])]
        spots.append(cv.points[int(idx[0])].sparsity)
        abs_per.append(worst)
        norm_per.append(_ratio(worst, cv.ref.mean[col]))
    counts = defaultdict(int)
    for s in spots:
        counts[s] += 1
    row = _head(a, cv, labels)
    row["pruning"] = min(counts, key=lambda s: (-counts[s], s))
    row["attack_sweet_spots"] = ", ".join(f"{atk} {100 * s:g}%" for atk, s in zip(a.attacks, spots))
    n = min(len(p.cell.runs) for p in cv.points)
    _with_ci(row, "worst_seed_abs", np.mean(abs_per, axis=0), a.level, n)
    _with_ci(row, "worst_seed_norm", np.mean(norm_per, axis=0), a.level, min(n, len(cv.ref.runs)))
    row["seeds"] = n
    row["baseline"] = cv.ref_text
    return row


def _aggregated_rows(a: Analysis, ref_for, labels) -> list[dict]:
    rows = []
    for cell in a.cells.values():
        ref, ref_text = ref_for(cell.kappa, cell.method, cell.variant)
        p = _point(cell, ref, a.attacks)
        h = a.setting.headline
        row = {"setting": a.setting.id, "env": a.setting.task, "evaluation": mode_text(a), "eps": h["eps"],
               "frames": h["frames"], "episodes": h["episodes"], "kappa": cell.kappa, "method": cell.method,
               "interval": labels.get(cell.variant, ""), "sparsity": cell.sparsity, "seeds": len(cell.runs),
               "seed_list": " ".join(str(s) for s in cell.seeds), "baseline": ref_text}
        for name, stat in (("clean_mean", "clean"), ("norm_clean", "norm_clean"), ("worst_mean", "worst"),
                           ("robust_worst", "norm_worst"), ("avg_attack_mean", "avg_attack"),
                           ("norm_robust_avg", "norm_avg"), ("score", "score")):
            _with_ci(row, name, p.stats[stat], a.level, p.n_for(stat))
        for atk in a.attacks:
            _with_ci(row, f"{atk}_mean", p.stats[f"attack:{atk}"], a.level, p.n_for("attack"))
            _with_ci(row, f"norm_{atk}", p.stats[f"norm:{atk}"], a.level, p.n_for("norm"))
        for name, stat in (("lipschitz_mean", "lipschitz"), ("bound_mean", "bound"),
                           ("actual_sparsity_mean", "actual_sparsity"),
                           *((f"{k}_mean", k) for k in CERTIFICATE_FIGURES)):
            _with_ci(row, name, p.stats[stat], a.level, p.n_for(stat))
        rows.append(row)
    rows.sort(key=lambda r: (r["kappa"], r["method"] != UNPRUNED, r["method"], str(r["interval"]), r["sparsity"]))
    return rows


# -- the verdict (issue 10, item 4) ------------------------------------------------------------
def verdict(row: dict, setting_task: str) -> dict:
    """Is there a sweet spot where pruning makes the policy more robust at ≥ 95% clean return?"""
    s, rw, lo, hi, clean = (row["sweet_spot"], row["robust_worst"], row["robust_worst_lo"],
                            row["robust_worst_hi"], row["clean"])
    has_ci = math.isfinite(lo) and math.isfinite(hi)
    above = math.isfinite(rw) and rw > 1
    excludes = has_ci and lo > 1
    clean_ok = math.isfinite(clean) and clean >= CLEAN_FLOOR
    n = min(row["seeds"], row["baseline_seeds"])
    if not math.isfinite(s):
        text = "undecided: no baseline to normalise to"
        effect = None
    elif s == 0:
        text = "absent: no pruned sparsity scores above the unpruned run"
        effect = False
    elif above and excludes and clean_ok and n < VERDICT_MIN_SEEDS:
        text = (f"undecided: worst-attack {rw:.2f}× with a CI excluding 1, but from {n} seeds (a verdict needs "
                f"≥ {VERDICT_MIN_SEEDS}; with so few the interval spans little more than the seeds themselves)")
        effect = None
    elif above and excludes and clean_ok:
        text = (f"present: at {100 * s:g}% the worst-attack return is {rw:.2f}× the baseline's "
                f"(CI [{lo:.2f}, {hi:.2f}] excludes 1) at {clean:.2f} of its clean return")
        effect = True
    elif above and excludes:
        text = (f"robustness up but clean return down: worst-attack {rw:.2f}× (CI excludes 1), "
                f"clean {clean:.2f} < {CLEAN_FLOOR}")
        effect = False
    elif above and not has_ci:
        text = f"not shown: worst-attack {rw:.2f}× but no CI (a cell with a single seed, or resamples=0)"
        effect = None
    elif above:
        text = f"not shown: worst-attack {rw:.2f}×, CI [{lo:.2f}, {hi:.2f}] includes 1"
        effect = False
    else:
        text = f"absent: worst-attack return at the sweet spot is {rw:.2f}× the baseline's (not above 1)"
        effect = False
    if n < VERDICT_MIN_SEEDS and not text.startswith("undecided"):
        # a negative verdict needs as many seeds as a positive one: below that, say what the
        # point estimates show and that they decide nothing
        text = f"undecided ({n} {'seed' if n == 1 else 'seeds'}; a verdict needs ≥ {VERDICT_MIN_SEEDS}) — so far {text}"
        effect = None
    paper = PAPER_TABLE2.get((setting_task, row["method"]))
    cmp = ""
    if paper is not None:
        ps, pc, pw, pa = paper
        where = ("inside" if has_ci and lo <= pw <= hi else "above" if has_ci and pw > hi
                 else "below" if has_ci else "vs")
        cmp = (f"paper (SA-trained): {100 * ps:g}%, clean {pc:.2f}, robust (worst) {pw:.2f}, norm. robust (avg) "
               f"{pa:.2f}; the paper's robust (worst) is {where} " + ("our CI" if has_ci else f"our {rw:.2f}"))
    return {"text": text, "effect": effect, "robust_above_1": above, "ci_excludes_1": excludes,
            "clean_ok": clean_ok, "seeds": n, "paper": cmp}
