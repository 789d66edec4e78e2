"""``python -m prunerl report runs=DIR out=DIR``: from a folder of run directories to the paper's
sweet-spot tables (Tables 2 and 3), figures (Figs. 2–5, L̃ and the certified bound vs sparsity, the
per-state certificates of issue 14 where the runs have them), CSVs
of the aggregated numbers and a markdown summary with a computed verdict. Works offline from the
run directory contract (config.yaml + summary.json); no W&B needed.

:mod:`prunerl.runset` decides which runs count and which may be compared; :mod:`prunerl.sweetspot`
holds the definitions and the statistics; this module checks the options, writes the files and
says what it did.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from prunerl import atomic
from prunerl.config import ConfigError
from prunerl.runset import RunSet, Setting, read_runs, settings
from prunerl.sweetspot import (CLEAN_FLOOR, NORMALIZE, VERDICT_MIN_SEEDS, Analysis, analyse, ci, mode_text,
                               variant_labels, verdict)


# -- output ------------------------------------------------------------------------------------
def _fmt(x, pct=False, digits=2):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if pct:
        return f"{100 * x:.0f}%"
    if isinstance(x, float):
        return f"{x:,.{digits}f}" if abs(x) < 1e6 else f"{x:.3g}"
    return str(x)


def _fmt_ci(row, name, digits=2):
    v = _fmt(row.get(name), digits=digits)
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if v == "–" or lo is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return v
    return f"{v} [{_fmt(lo, digits=digits)}, {_fmt(hi, digits=digits)}]"


def _markdown_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, kind) with kind "", "pct", "ci", "ci0" (CI, no decimals), "share"."""
    def cell(r, key, kind):
        if kind == "pct":
            return _fmt(r.get(key), pct=True)
        if kind == "ci":
            return _fmt_ci(r, key)
        if kind == "ci0":
            return _fmt_ci(r, key, digits=0)
        if kind == "share":
            return _fmt(r.get(key), pct=True)
        if key == "kappa":
            return f"{r[key]:g}"
        return _fmt(r.get(key))
    head = "| " + " | ".join(c[1] for c in cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n"
    return head + "".join("| " + " | ".join(cell(r, k, kind) for k, _, kind in cols) + " |\n" for r in rows)


T2_COLS = [("env", "Environment", ""), ("kappa", "κ", ""), ("method", "Method", ""), ("interval", "Interval", ""),
           ("sweet_spot", "Sweet-spot %", "pct"), ("clean", "Clean", "ci"), ("robust_worst", "Robust (worst)", "ci"),
           ("norm_robust_avg", "Norm. robust (avg)", "ci"), ("clean_return", "Clean return", "ci0"),
           ("worst_return", "Worst-attack return", "ci0"), ("seeds", "Seeds", ""),
           ("sweet_spot_share", "Same spot in bootstrap", "share"), ("baseline", "Baseline", "")]
T3_COLS = [("env", "Environment", ""), ("kappa", "κ", ""), ("method", "Method", ""), ("interval", "Interval", ""),
           ("pruning", "Pruning %", "pct"), ("worst_seed_abs", "Avg. worst-seed abs", "ci0"),
           ("worst_seed_norm", "Avg. worst-seed norm", "ci"), ("attack_sweet_spots", "Attack sweet spots", ""),
           ("seeds", "Seeds", ""), ("baseline", "Baseline", "")]


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        atomic.write_text(path, "")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic.atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})


def _label(method, interval, kappa=None):
    s = method if not interval else f"{method} (Δt={interval})"
    return s if kappa is None else f"{s}, κ={kappa:g}"


def _fig_suffix(a: Analysis, all_settings: list[Setting]) -> str:
    same_task = [s for s in all_settings if s.task == a.setting.task]
    return a.setting.task if len(same_task) == 1 else a.setting.id


def make_figures(a: Analysis, out: Path, suffix: str) -> list[Path]:
    """Figs. 2–5 and L̃ / certified bound vs sparsity for one setting, with CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    labels = variant_labels(a.setting.runs)
    lvl = f"{100 * a.level:g}% CI"
    ref_k = sorted({cv.ref.kappa for cv in a.curves if cv.ref is not None})
    main_k = ref_k[0] if ref_k else (max(cv.kappa for cv in a.curves) if a.curves else None)
    title = f"{a.setting.id}"

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        atomic.savefig(fig, path, dpi=110)
        plt.close(fig)
        files.append(path)

    def band(ax, pts, stat, **kw):
        x = np.array([100 * p.sparsity for p in pts])
        y = np.array([p.stats[stat][0] for p in pts])
        lo_hi = np.array([ci(p.stats[stat], a.level, p.n_for(stat)) for p in pts]).reshape(-1, 2)
        (line,) = ax.plot(x, y, marker="o", **kw)
        ok = np.isfinite(lo_hi).all(axis=1)
        if ok.any():
            ax.fill_between(x[ok], lo_hi[ok, 0], lo_hi[ok, 1], alpha=0.2, color=line.get_color())

    # one curve per method in Figs. 2–4 and the L̃ figure: its variant with the most runs (the
    # methods sweep's interval); the other intervals are Fig. 5's
    runs_of = defaultdict(int)
    for r in a.setting.runs:
        runs_of[(r.method, r.variant)] += 1
    primary = {}
    for cv in a.curves:
        best = primary.get(cv.method)
        if best is None or (runs_of[(cv.method, cv.variant)], repr(best)) > (runs_of[(cv.method, best)], repr(cv.variant)):
            primary[cv.method] = cv.variant
    curves = [cv for cv in a.curves if primary[cv.method] == cv.variant]
    main = [cv for cv in curves if cv.kappa == main_k]
    if not main:
        return files

    def grid(n):
        cols = min(n, 3)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        return fig, list(axes.flat)
    base_text = main[0].ref_text
    # Fig. 2: normalised clean and robust (avg, worst) vs sparsity, per method
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    for cv in main:
        for ax, stat in zip(axes, ("norm_clean", "norm_avg", "norm_worst")):
            band(ax, cv.points, stat, label=_label(cv.method, labels[cv.variant]))
    for ax, t in zip(axes, ("normalised clean return", "normalised robust return (avg over attacks)",
                            "normalised robust return (worst attack)")):
        ax.set(xlabel="sparsity (%)", ylabel=t, title=f"{title} (κ={main_k:g})")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"normalised to {base_text}; bands: {lvl} over seeds", fontsize=9)
    save(fig, f"fig2_frontier_{suffix}.png")

    # Fig. 3: per attack, return vs sparsity, per method
    panels = [("clean", "clean"), *((f"attack:{x}", x) for x in a.attacks), ("worst", "worst attack")]
    fig, axes = grid(len(panels))
    for ax, (stat, name) in zip(axes, panels):
        for cv in main:
            band(ax, cv.points, stat, label=_label(cv.method, labels[cv.variant]))
        ax.set(xlabel="sparsity (%)", ylabel="return", title=f"{title}: {name}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=lvl, title_fontsize=7)
    save(fig, f"fig3_attacks_{suffix}.png")

    # Fig. 4: with and without SA (κ = 0 vs κ > 0), per attack
    kappas = sorted({cv.kappa for cv in curves})
    if len(kappas) > 1:
        fig, axes = grid(len(panels))
        for ax, (stat, name) in zip(axes, panels):
            for cv in curves:
                band(ax, cv.points, stat, label=_label(cv.method, labels[cv.variant], cv.kappa),
                     ls="-" if cv.kappa > 0 else "--")
            ax.set(xlabel="sparsity (%)", ylabel="return", title=f"{title}: {name}, with/without SA")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, title=lvl, title_fontsize=7)
        save(fig, f"fig4_sa_{suffix}.png")

    # Fig. 5: mask-update interval ablation (methods with several intervals)
    by_method = defaultdict(list)
    for cv in a.curves:
        by_method[(cv.kappa, cv.method)].append(cv)
    ablated = {k: cvs for k, cvs in by_method.items() if len(cvs) > 1}
    if ablated:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for (kk, m), cvs in sorted(ablated.items(), key=repr):
            for cv in cvs:
                lab = f"{m}, κ={kk:g}, " + ("one-shot" if cv.variant and dict(cv.variant).get("interval") == 0
                                            else f"Δt={labels[cv.variant]}")
                band(axes[0], cv.points, "norm_clean", label=lab)
                band(axes[1], cv.points, "norm_avg", label=lab)
        for ax, t in zip(axes, ("normalised clean", "normalised robust (avg)")):
            ax.set(xlabel="sparsity (%)", ylabel=t, title=f"{title}: mask-update interval")
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, title=lvl, title_fontsize=7)
        save(fig, f"fig5_interval_{suffix}.png")

    # L̃ and the certified bound vs sparsity
    if any(math.isfinite(p.stats["lipschitz"][0]) for cv in a.curves for p in cv.points):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for cv in curves:
            lab = _label(cv.method, labels[cv.variant], cv.kappa)
            band(axes[0], cv.points, "lipschitz", label=lab)
            band(axes[1], cv.points, "bound", label=lab)
        axes[0].set(xlabel="sparsity (%)", ylabel="L̃ (Thm. 1 surrogate, actor; ℓ2 → ℓ2)", yscale="log",
                    title=f"{title}: Lipschitz surrogate")
        axes[1].set(xlabel="sparsity (%)", ylabel="certified bound α·c·L̃_∞·ε (ℓ∞ ball)", yscale="log",
                    title=f"{title}: certified bound")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, title=lvl, title_fontsize=7)
        save(fig, f"lipschitz_{suffix}.png")

    # issue 14: the median per-state certificate (IBP, CROWN) beside the global L̃_∞·ε, vs sparsity;
    # runs from before the per-state certificates have none, and then there is no figure
    if any(math.isfinite(p.stats[k][0]) for cv in curves for p in cv.points for k in ("cert_ibp", "cert_crown")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        styles = (("cert_crown", "CROWN, median", "-"), ("cert_ibp", "IBP, median", "--"),
                  ("cert_global", "global L̃_∞·ε", ":"))
        for i, cv in enumerate(curves):
            lab = _label(cv.method, labels[cv.variant], cv.kappa)
            for ax, tv in zip(axes, ("", "_tv")):
                for stat, name, ls in styles:
                    if any(math.isfinite(p.stats[stat + tv][0]) for p in cv.points):
                        band(ax, cv.points, stat + tv, label=f"{lab}: {name}", ls=ls, color=f"C{i % 10}")
        axes[0].set(xlabel="sparsity (%)", ylabel="bound on max over the ℓ∞ ball of ‖μ(ŝ)−μ(s)‖₂", yscale="log",
                    title=f"{title}: per-state vs global certificate")
        axes[1].set(xlabel="sparsity (%)", ylabel="certified TV bound c·Δ (Lemma 1)", yscale="log",
                    title=f"{title}: certified total variation")
        for ax in axes:
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=6, title=f"medians over the last rollout's states; {lvl}", title_fontsize=6)
        save(fig, f"certificates_{suffix}.png")
    return files


def _check_out(out: Path) -> None:
    """out= must be a directory we can create or write, checked before anything is written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} exists and is not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"out={out} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"out={out} is not writable ({probe} does not allow writing)")


def check_options(normalize: str, baseline_kappa, resamples, level, seed=0) -> None:
    if normalize not in NORMALIZE:
        raise ConfigError(f"normalize={normalize!r} is not allowed; allowed: {list(NORMALIZE)} "
                          "(sa: every κ to the unpruned SA-trained run, as the paper; same_kappa: each κ to its own)")
    if baseline_kappa is not None:
        if isinstance(baseline_kappa, bool) or not isinstance(baseline_kappa, (int, float)) or baseline_kappa < 0:
            raise ConfigError(f"baseline_kappa={baseline_kappa!r} must be a κ >= 0 present in the runs (or null)")
        if normalize != "sa":
            raise ConfigError(f"baseline_kappa={baseline_kappa} only applies to normalize=sa (got normalize={normalize})")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 0:
        raise ConfigError(f"resamples={resamples!r} must be an integer >= 0 (bootstrap replicates; 0: no CIs)")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ConfigError(f"ci={level!r} must lie in (0, 1), e.g. 0.95")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"bootstrap_seed={seed!r} must be an integer >= 0")


def report(runs_dir: str | Path, out_dir: str | Path, *, normalize: str = "sa", baseline_kappa: float | None = None,
           resamples: int = 5000, ci_level: float = 0.95, seed: int = 0) -> dict:
    """Read ``runs_dir``, write tables, CSVs, figures and ``summary.md`` to ``out_dir``.

    Raises :class:`ConfigError` (and writes nothing) when the options are bad, ``runs_dir`` is not a
    folder of run directories, or ``out_dir`` cannot be written."""
    runs_dir, out = Path(runs_dir), Path(out_dir)
    check_options(normalize, baseline_kappa, resamples, ci_level, seed)
    if not runs_dir.is_dir():
        raise ConfigError(f"runs={runs_dir} is not a directory")
    rs = read_runs(runs_dir)
    if rs.folders == 0:
        raise ConfigError(f"runs={runs_dir} holds no run directories (no config.yaml below it)")
    if not rs.runs:
        why = rs.problems[0] if rs.problems else rs.skipped[0] if rs.skipped else ("", "")
        raise ConfigError(f"runs={runs_dir} holds {rs.folders} run directories but none with results "
                          f"({len(rs.problems)} problems, {len(rs.skipped)} skipped; e.g. {why[0]}: {why[1]})")
    sets = settings(rs.runs)
    if baseline_kappa is not None:
        for s in sets:
            present = sorted({r.kappa for r in s.runs})
            if float(baseline_kappa) not in present:
                raise ConfigError(f"baseline_kappa={baseline_kappa}: setting {s.id} has no runs at that κ "
                                  f"(κ present: {', '.join(f'{k:g}' for k in present)})")
    _check_out(out)
    opts = dict(normalize=normalize, baseline_kappa=baseline_kappa, resamples=resamples, level=ci_level, seed=seed)
    primary = [a for s in sets if (a := analyse(s, "primary", **opts)) is not None]
    stochastic = [a for s in sets if (a := analyse(s, "stochastic", **opts)) is not None]

    out.mkdir(parents=True, exist_ok=True)
    t2 = [r for a in primary for r in a.table2]
    t3 = [r for a in primary for r in a.table3]
    t2s = [r for a in stochastic for r in a.table2]
    verdicts = [{**r, **{f"verdict_{k}": v for k, v in verdict(r, r["env"]).items()}} for r in t2]
    _write_csv(out / "aggregated.csv", [r for a in primary + stochastic for r in a.aggregated])
    _write_csv(out / "table2_sweet_spots.csv", t2)
    _write_csv(out / "table3_worst_seed.csv", t3)
    _write_csv(out / "verdict.csv", [{k: v for k, v in r.items() if k.startswith("verdict_") or k in
                                      ("setting", "env", "kappa", "method", "interval", "sweet_spot", "clean",
                                       "robust_worst", "robust_worst_lo", "robust_worst_hi", "score")}
                                     for r in verdicts])
    _write_csv(out / "runs.csv", _run_rows(rs, sets))
    if t2s:
        _write_csv(out / "table2_sweet_spots_stochastic.csv", t2s)
    figs = []
    for a in primary:
        figs += make_figures(a, out, _fig_suffix(a, sets))

    md = _summary_md(runs_dir, rs, sets, primary, stochastic, verdicts, figs, normalize, resamples, ci_level, seed)
    atomic.write_text(out / "table2_sweet_spots.md", _tables_md(primary, "table2"))
    atomic.write_text(out / "table3_worst_seed.md", _tables_md(primary, "table3"))
    if t2s:
        atomic.write_text(out / "table2_sweet_spots_stochastic.md", _tables_md(stochastic, "table2"))
    atomic.write_text(out / "summary.md", md)
    return {"runs": len(rs.runs), "problems": rs.problems, "skipped": rs.skipped, "duplicates": rs.duplicates,
            "settings": [s.id for s in sets], "table2": t2, "table3": t3, "table2_stochastic": t2s,
            "verdicts": verdicts, "figures": [str(f) for f in figs], "out": str(out)}


def _run_rows(rs: RunSet, sets: list[Setting]) -> list[dict]:
    where = {str(r.path): s.id for s in sets for r in s.runs}
    rows = []
    for s in sets:
        for r in s.runs:
            ev = r.evaluations["primary"]
            rows.append({"run_dir": str(r.path), "status": "used", "setting": s.id, "kappa": r.kappa,
                         "method": r.method, "sparsity": r.sparsity, "interval": r.interval, "seed": r.seed,
                         "clean_return": ev.clean, **{f"{k}_return": v for k, v in sorted(ev.attacks.items())},
                         "note": ""})
    for kept, others, note in rs.duplicates:
        for o in others:
            rows.append({"run_dir": o, "status": "duplicate", "setting": where.get(kept, ""),
                         "note": f"same run as {kept}" + (f"; {note}" if note else "")})
    rows += [{"run_dir": p, "status": "skipped", "note": why} for p, why in rs.skipped]
    rows += [{"run_dir": p, "status": "problem", "note": why} for p, why in rs.problems]
    return rows


def _setting_heading(a: Analysis, n_settings: int) -> str:
    label = a.setting.label_for(mode_text(a))
    return f"### {a.setting.id}: {label}" if n_settings > 1 else f"*{label}.*"


def _tables_md(analyses: list[Analysis], which: str) -> str:
    parts = []
    for a in analyses:
        rows, cols = (a.table2, T2_COLS) if which == "table2" else (a.table3, T3_COLS)
        parts += [_setting_heading(a, len(analyses)), "",
                  f"Evaluation: {mode_text(a)}. Normalisation: {a.ref_kappa_rule}. "
                  f"Values: point [{100 * a.level:g}% CI].", "",
                  _markdown_table(rows, cols) if rows else "(no pruned runs in this setting)", ""]
    return "\n".join(parts)


def _summary_md(runs_dir, rs: RunSet, sets, primary, stochastic, verdicts, figs, normalize, resamples, level,
                seed) -> str:
    n_dup = sum(len(o) for _, o, _ in rs.duplicates)
    lines = [f"# PruneRL report: `{runs_dir}`", "",
             f"{rs.folders} run directories found: **{len(rs.runs)} runs used**, {n_dup} duplicate folders "
             f"(the same run again, counted once), {len(rs.skipped)} skipped (not runs of the sweep), "
             f"{len(rs.problems)} problems. Every directory and what became of it: [runs.csv](runs.csv).", ""]
    lines += ["## Settings", "",
              "Runs are compared only within a setting: same task and the same config apart from seed, κ and "
              "pruning, and the same evaluation (ε, budget, deterministic/stochastic, episodes, attacks).", ""]
    for s in sets:
        counts = defaultdict(set)
        for r in s.runs:
            counts[r.kappa].add(r.seed)
        per_k = "; ".join(f"κ={k:g}: {sum(r.kappa == k for r in s.runs)} runs, seeds {sorted(v)}"
                          for k, v in sorted(counts.items()))
        differs = (" — differs from the task's other settings in: "
                   + ", ".join(f"`{k}={v}`" for k, v in s.differs.items())) if s.differs else ""
        lines.append(f"- **{s.id}**: {s.label} ({per_k}){differs}")
    lines += ["", "## How the figures are computed", "",
              "- Normalisation: " + ("every curve, κ = 0 included, is normalised to the unpruned SA-trained run "
                                     "(paper Sec. 4.5; `normalize=sa`, pick its κ with `baseline_kappa=`)"
                                     if normalize == "sa" else
                                     "each κ is normalised to its own unpruned run (`normalize=same_kappa`)")
              + ". The baseline is the dense `pruning=none` run, or, where the sweep has none, the method's own 0% "
                "run; every table row names the one it used.",
              "- Clean = normalised clean return. Robust (worst) = the runs' worst-attack return (per seed, the "
              "lowest of its attack returns), normalised by the baseline's. Norm. robust (avg) = the average over "
              "attacks of each attack's normalised return. Sweet spot = the sparsity maximising "
              "(Clean + Norm. robust (avg)) / 2; ties favour the smaller sparsity.",
              f"- Brackets: {100 * level:g}% confidence intervals over seeds: a bootstrap ({resamples} resamples of "
              f"each cell's seeds, seed {seed}) with the expanded percentile interval (Hesterberg 2015), whose tails "
              "are widened to a t interval's for the few seeds behind each figure; values at the sweet spot are at "
              "that sparsity. 'Same spot in bootstrap' is the share of resamples whose sweet spot is the same "
              f"sparsity. A cell with one seed has no CI (–); a verdict needs ≥ {VERDICT_MIN_SEEDS} seeds per cell.",
              ""]
    lines += ["## Verdict", ""]
    lines += _verdict_md(primary, verdicts)
    lines += ["## Table 2 — sweet spots", "", _tables_md(primary, "table2")]
    if stochastic:
        lines += ["## Table 2 — sweet spots, stochastic evaluation", "",
                  "From `summary.json`'s `evaluation_stochastic` (a ~ π(·|ŝ)), for the runs that recorded it.", "",
                  _tables_md(stochastic, "table2")]
    lines += ["## Table 3 — worst-seed robustness", "",
              "Per attack, the sparsity with the highest seed-mean return; its worst seed, averaged over attacks "
              "(absolute, and normalised by the baseline's seed-mean return of each attack). Pruning % is the mode "
              "of the attack sweet spots (ties favour the smaller).", "", _tables_md(primary, "table3")]
    lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figs]
    lines += ["", "## Data", "",
              "- [aggregated.csv](aggregated.csv) — every (setting, evaluation, κ, method, interval, sparsity) "
              "cell: means with `_lo`/`_hi` CI bounds",
              "- [table2_sweet_spots.csv](table2_sweet_spots.csv), [table3_worst_seed.csv](table3_worst_seed.csv), "
              "[verdict.csv](verdict.csv), [runs.csv](runs.csv)"
              + (", [table2_sweet_spots_stochastic.csv](table2_sweet_spots_stochastic.csv)" if stochastic else ""),
              ""]
    notes = [f"{a.setting.id} ({a.mode}): {n}" for a in primary + stochastic for n in a.notes]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    if rs.duplicates:
        lines += ["## Duplicates (one run in several folders, counted once)", ""]
        lines += [f"- kept `{kept}`; also in " + ", ".join(f"`{o}`" for o in others) + (f" ({note})" if note else "")
                  for kept, others, note in rs.duplicates] + [""]
    if rs.skipped:
        lines += ["## Skipped (not runs of the sweep)", ""] + [f"- `{p}`: {why}" for p, why in rs.skipped] + [""]
    if rs.problems:
        lines += ["## Missing or failed runs", ""] + [f"- `{p}`: {why}" for p, why in rs.problems] + [""]
    return "\n".join(lines)


def _who(v: dict, multi: bool) -> str:
    who = (f"{v['setting']}, " if multi else f"{v['env']}, ") + f"κ={v['kappa']:g}, {v['method']}"
    return who + (f" (Δt={v['interval']})" if v["interval"] else "")


def _verdict_md(primary: list[Analysis], verdicts: list[dict]) -> list[str]:
    if not verdicts:
        return ["No pruned runs: nothing to decide.", ""]
    lines = [f"Computed from Table 2: is there a sparsity where (Clean + Norm. robust (avg)) / 2 peaks with "
             f"Robust (worst) above 1, its CI excluding 1, and Clean ≥ {CLEAN_FLOOR}?", ""]
    multi = len(primary) > 1
    for v in verdicts:
        who = _who(v, multi)
        facts = (f"sweet spot {_fmt(v['sweet_spot'], pct=True)}: score {_fmt_ci(v, 'score')}, "
                 f"Clean {_fmt_ci(v, 'clean')}, Robust (worst) {_fmt_ci(v, 'robust_worst')}, "
                 f"Norm. robust (avg) {_fmt_ci(v, 'norm_robust_avg')}, {v['seeds']} seeds; "
                 f"baseline {v['baseline']}")
        line = f"- **{who}** — **{v['verdict_text']}**. {facts}."
        if v["verdict_paper"]:
            line += f" Compared with the {v['verdict_paper']}."
        lines.append(line)
    def names(vs):
        return ", ".join(_who(v, multi) for v in vs)

    found = [v for v in verdicts if v["verdict_effect"] is True]
    open_ = [v for v in verdicts if v["verdict_effect"] is None]
    if found:
        overall = f"**The effect is present** in {names(found)}."
    elif open_:
        overall = (f"**Undecided**: no row shows the effect, and {names(open_)} cannot be decided from these runs "
                   "(too few seeds or no baseline).")
    else:
        # "absent" only where no row even points the paper's way: a worst-attack gain whose CI
        # includes 1 neither shows the effect nor rules it out
        unclear = [v for v in verdicts if v["verdict_robust_above_1"] and not v["verdict_ci_excludes_1"]]
        if unclear:
            overall = (f"**Not shown here**: no row has a pruned sweet spot whose worst-attack return is above the "
                       f"baseline's with a CI excluding 1 while keeping ≥ {CLEAN_FLOOR} of the clean return. In "
                       f"{names(unclear)} the point estimate is above 1 but its CI includes 1: these runs neither "
                       "show the effect nor rule it out (more seeds, or victims that vary less, would).")
        else:
            overall = ("**The effect is absent here**: no row has a pruned sweet spot whose worst-attack return is "
                       f"above the baseline's, with or without a CI excluding 1, while keeping ≥ {CLEAN_FLOOR} of the "
                       "clean return.")
    lines += ["", overall, ""]
    return lines
