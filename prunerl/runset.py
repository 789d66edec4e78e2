"""Which run directories a report counts, and which of them may be compared.

The report's first job is bookkeeping (issue 9, item 4): a folder of run directories is not a
set of runs until

- every folder with a ``config.yaml`` has been read, and those that failed or never finished are
  listed, not dropped (``problems``);
- a learned adversary's own run directory (``<ckpt stem>.adversary-<key>/``, written beside a
  victim's checkpoint, its config naming the ``victim``) is set aside: it is a run *about* a
  member of the sweep, not a member (``skipped``);
- one run held by several folders counts once (``duplicates``): two run directories are the same
  run when their resolved configs agree on everything but where and how the run was written
  (:data:`IGNORED`), e.g. ``sweep=methods`` and ``sweep=interval`` both writing the magnitude
  Δt = 15 cells under different names, or a run copied twice;
- runs that differ in anything but the sweep's own axes (seed, κ, pruning) — ε, budget,
  deterministic or stochastic evaluation, episodes, the recipe — fall into separate *settings*
  (:func:`settings`), each reported on its own and labelled by the values that differ.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prunerl.rundir import read_summary

UNPRUNED = "none"

# Where and how a run was written, not what it computed: left out when comparing configs
# (env.engine too: the engines are bit-identical, tests/test_engines.py).
IGNORED = ("run_dir", "resume", "skip_finished", "hydra", "logger", "device", "torch_threads", "env.threads",
           "env.engine", "checkpoint", "victim", "trainer.accelerator", "trainer.devices", "trainer.enable_model_summary",
           "trainer.log_every_n_steps", "callbacks.progress",
           # what the Lipschitz callback measures, not what the run trained or evaluated; added with
           # issue 14, so runs from before and after it stay one setting
           "callbacks.lipschitz.certificates", "callbacks.lipschitz.certificate_threshold",
           # the per-task recipe's defaults: what they set is in algo.ent_coef / algo.model.sigma
           "env.recipe")
# The sweep's own axes: a setting is everything else.
AXES = ("seed", "algo.kappa", "pruning", "callbacks.pruning")
# Pruning keys beside the method and its final sparsity: a curve is one (method, these) pair.
VARIANT_KEYS = ("interval", "burn_in", "end", "allocation", "scope")
# Settings every table names (from summary.json where it records what actually ran).
HEADLINE = ("env_id", "eps", "frames", "deterministic", "episodes", "attacks")


@dataclass
class Evaluation:
    clean: float
    attacks: dict[str, float]


@dataclass
class Run:
    path: Path
    fingerprint: str
    task: str
    method: str
    sparsity: float                    # the run's target (config/summary final_sparsity; 0 for none)
    kappa: float
    seed: int
    variant: tuple                     # ((key, value), ...) over VARIANT_KEYS; () for none
    setting: dict                      # key -> value: everything but the axes and IGNORED
    evaluations: dict[str, Evaluation]  # "primary" (summary's clean_return/attack_returns), "stochastic"
    lipschitz: float | None
    bound: float | None
    actual_sparsity: float | None
    # issue 14: median per-state certificates and the global figure (CERTIFICATE_FIGURES); empty
    # for runs from before them
    certificates: dict[str, float] = field(default_factory=dict)

    @property
    def interval(self):
        return dict(self.variant).get("interval")


@dataclass
class RunSet:
    runs: list[Run] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)      # (run dir, what is wrong)
    skipped: list[tuple[str, str]] = field(default_factory=list)       # (dir, why it is not a run of the sweep)
    duplicates: list[tuple[str, list[str], str]] = field(default_factory=list)  # (kept, [others], note)
    folders: int = 0                                                    # folders with a config.yaml


def flatten(d, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples (hashable, comparable)."""
    out = {}
    if isinstance(d, dict):
        if not d and prefix:
            out[prefix] = None
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    out[key] = tuple(_hashable(x) for x in d) if isinstance(d, list) else d
    return out


def _hashable(x):
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    if isinstance(x, dict):
        return json.dumps(x, sort_keys=True, default=str)
    return x


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


#: ``algo.sa`` keys that only one SA method reads (the other computes the same run whatever they are)
SA_METHOD_KEYS = {"sgld": ("algo.sa.steps", "algo.sa.step_ratio"),
                  "convex": ("algo.sa.beta_start", "algo.sa.beta_end", "algo.sa.beta_ramp")}


def run_config(cfg: dict) -> dict:
    """The flattened config that defines what a run computed: IGNORED keys dropped; for an
    unpruned run every pruning key but the criterion (``pruning=none pruning.final_sparsity=0.3``
    trains the same dense network as ``pruning=none``); and the ``algo.sa`` keys of the SA method the
    run did not use. A run saved before ``algo.sa.method`` existed used ``sgld``. (At κ = 0 the SA
    keys are kept: the report's settings compare κ = 0 with κ > 0 runs of the same config.)"""
    flat = {k: v for k, v in flatten(cfg).items() if not _under(k, IGNORED)}
    if flat.get("pruning.criterion") == UNPRUNED:
        flat = {k: v for k, v in flat.items()
                if not (_under(k, ("pruning", "callbacks.pruning")) and k != "pruning.criterion")}
    if any(_under(k, ("algo.sa",)) for k in flat):
        method = flat.get("algo.sa.method", "sgld")
        unused = {k for m, keys in SA_METHOD_KEYS.items() if m != method for k in keys}
        flat = {k: v for k, v in flat.items() if k not in unused}
        flat["algo.sa.method"] = method
    return flat


def run_config_diff(run_dir: str | Path, config: dict) -> str:
    """How the run saved in ``run_dir`` (its config.yaml) differs from ``config`` as a run — the
    report's definition of "the same run" (:func:`prunerl.runset.run_config`); "" when it does not."""
    import yaml

    saved_path = Path(run_dir) / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else {}
    there, now = run_config(saved or {}), run_config(config)
    diff = [(k, there.get(k, "<absent>"), now.get(k, "<absent>")) for k in sorted(set(there) | set(now))
            if there.get(k, "<absent>") != now.get(k, "<absent>")]
    return "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:5])


def fingerprint(cfg: dict) -> str:
    """Two run directories hold the same run iff their fingerprints are equal."""
    return json.dumps(sorted(run_config(cfg).items(), key=lambda kv: kv[0]), default=str)


def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _number(v):
    return None if v is None else float(v)


def _lipschitz_value(v):
    """summary.json may hold a number or a mapping (e.g. {"actor": .., "critic": ..}); the actor's
    figure is the one the certified bound uses."""
    if isinstance(v, dict):
        v = v.get("actor", next(iter(v.values()), None))
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


# The report's certificate figures (issue 14) and where summary.json's ``certificates`` holds them:
# the median over the last rollout's states of the per-state bound Δ(s) on ‖μ(ŝ)−μ(s)‖₂ (IBP, CROWN)
# and the global L̃_∞·ε; ``_tv``: the same times c (the certified TV bounds).
CERTIFICATE_FIGURES = {
    "cert_ibp": ("ibp", "dmu", "median"), "cert_crown": ("crown", "dmu", "median"), "cert_global": ("global", "dmu"),
    "cert_ibp_tv": ("ibp", "tv", "median"), "cert_crown_tv": ("crown", "tv", "median"),
    "cert_global_tv": ("global", "tv"),
}


def _certificate_values(s: dict) -> dict[str, float]:
    cert = s.get("certificates")
    if not isinstance(cert, dict):
        return {}
    out = {}
    for name, path in CERTIFICATE_FIGURES.items():
        v = _get(cert, *path)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


def _evaluation(clean, attacks) -> Evaluation | None:
    if clean is None:
        return None
    return Evaluation(float(clean), {str(k): float(v) for k, v in (attacks or {}).items() if v is not None})


def _setting(cfg_flat: dict, s: dict, primary: Evaluation) -> dict:
    """What a run was (not its axes): its config minus the axes, with the evaluation figures
    summary.json records as actually run (they win over the config: `evaluate` may have re-run them)."""
    setting = {k: v for k, v in cfg_flat.items() if not _under(k, AXES)}
    ev = s.get("evaluation") or {}
    setting.update({
        "env_id": s.get("env_id") or cfg_flat.get("env.id"),
        "eps": _number(ev.get("eps", s.get("eps", cfg_flat.get("env.eps")))),
        "frames": s.get("frames", cfg_flat.get("total_frames")),
        "deterministic": ev.get("deterministic", cfg_flat.get("evaluation.deterministic")),
        "episodes": ev.get("episodes", cfg_flat.get("evaluation.episodes")),
        "attacks": tuple(sorted(primary.attacks)),
    })
    return setting


def _is_adversary(run_dir: Path, root: Path, cfg: dict) -> str | None:
    if cfg.get("victim") is not None:
        return f"a learned adversary's run (victim: {cfg['victim']}), not a run of the sweep"
    rel = run_dir.relative_to(root).parts if run_dir != root else ()
    if "checkpoints" in rel[:-1] or ".adversary-" in run_dir.name:
        return "a run directory inside a checkpoints/ folder (a learned adversary's), not a run of the sweep"
    return None


def read_runs(root: str | Path) -> RunSet:
    """Every run directory under ``root`` (a folder with a ``config.yaml``), de-duplicated; see the
    module docstring for what is skipped, listed as a problem or counted once."""
    root = Path(root)
    out = RunSet()
    candidates = []  # (run_dir, cfg, summary or None, why-unusable or None)
    for cfg_path in sorted(root.rglob("config.yaml")):
        run_dir = cfg_path.parent
        if ".hydra" in run_dir.relative_to(root).parts:
            continue  # Hydra's own copy of the unresolved config, not a run directory
        out.folders += 1
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            out.problems.append((str(run_dir), f"config.yaml is not valid YAML ({e})"))
            continue
        if not isinstance(cfg, dict):
            out.problems.append((str(run_dir), "config.yaml is not a mapping"))
            continue
        why_skip = _is_adversary(run_dir, root, cfg)
        if why_skip:
            out.skipped.append((str(run_dir), why_skip))
            continue
        summary, why = None, None
        if not (run_dir / "summary.json").exists():
            why = "no summary.json (the run failed or has not finished)"
        else:
            try:
                summary = read_summary(run_dir)
            except (OSError, json.JSONDecodeError) as e:
                why = f"summary.json is unreadable ({e})"
            else:
                if summary.get("status") == "interrupted":
                    why = (f"interrupted by {summary.get('interrupted_by')} at {summary.get('frames')} frames "
                           f"(resume it: python -m prunerl fit resume=auto hydra.run.dir={run_dir} [its overrides], "
                           f"or resume={summary.get('resume')})")
                elif summary.get("status") == "diverged":
                    why = f"diverged: {summary.get('error')} (last good checkpoint: {summary.get('last_good_checkpoint')})"
                elif summary.get("clean_return") is None:
                    why = "summary.json has no clean_return (evaluation did not run)"
        candidates.append((run_dir, cfg, summary, why))

    by_print: dict[str, list] = defaultdict(list)
    for c in candidates:
        by_print[fingerprint(c[1])].append(c)
    for fp, copies in sorted(by_print.items(), key=lambda kv: str(kv[1][0][0])):
        # keep the first finished copy (by path); the others are the same run again
        kept = next((c for c in copies if c[3] is None), copies[0])
        others = [c for c in copies if c is not kept]
        if others:
            out.duplicates.append((str(kept[0]), [str(c[0]) for c in others], _duplicate_note(kept, others)))
        run_dir, cfg, s, why = kept
        if why is not None:
            out.problems.append((str(run_dir), why))
            continue
        out.runs.append(_run(run_dir, fp, cfg, s))
    out.runs.sort(key=lambda r: str(r.path))
    return out


def _duplicate_note(kept, others) -> str:
    notes = []
    for run_dir, _, s, why in others:
        if why is not None:
            notes.append(f"{run_dir.name}: {why}")
        elif kept[2] is not None and (s.get("clean_return"), s.get("attack_returns")) != (
                kept[2].get("clean_return"), kept[2].get("attack_returns")):
            notes.append(f"{run_dir.name}: its returns differ (clean {_g(s.get('clean_return'))} vs "
                         f"{_g(kept[2].get('clean_return'))}): a re-run of the same config, counted once")
    return "; ".join(notes)


def _run(run_dir: Path, fp: str, cfg: dict, s: dict) -> Run:
    flat = run_config(cfg)
    method = s.get("pruning_method") or flat.get("pruning.criterion") or UNPRUNED
    sparsity = 0.0 if method == UNPRUNED else float(
        s.get("final_sparsity") if s.get("final_sparsity") is not None else flat.get("pruning.final_sparsity") or 0.0)
    variant = () if method == UNPRUNED else tuple((k, flat.get(f"pruning.{k}")) for k in VARIANT_KEYS)
    primary = _evaluation(s.get("clean_return"), s.get("attack_returns"))
    stoch = s.get("evaluation_stochastic") or {}
    evaluations = {"primary": primary}
    if _evaluation(stoch.get("clean_return"), stoch.get("attack_returns")) is not None:
        evaluations["stochastic"] = _evaluation(stoch.get("clean_return"), stoch.get("attack_returns"))
    return Run(
        path=run_dir, fingerprint=fp,
        task=s.get("env") or flat.get("env.name") or "?",
        method=method, sparsity=round(sparsity, 6),
        kappa=float(s.get("kappa", flat.get("algo.kappa", 0.0))),
        seed=int(s.get("seed", flat.get("seed", 0))),
        variant=variant, setting=_setting(flat, s, primary), evaluations=evaluations,
        lipschitz=_lipschitz_value(s.get("lipschitz_surrogate")),
        # summaries before the ℓ∞-ball bound (no certified_bound_ball) hold α·c·L̃·ε for an ℓ2 ball
        # of radius ε — not a certificate for the attacks' ball, so not read as one
        bound=_lipschitz_value(s.get("certified_bound")) if s.get("certified_bound_ball") == "linf" else None,
        actual_sparsity=_get(s, "sparsity", "global"),
        certificates=_certificate_values(s),
    )


@dataclass
class Setting:
    """Runs that may be compared: same task and same everything but seed, κ and pruning."""

    id: str                  # e.g. "hopper", or "hopper-2" when hopper has several settings
    task: str
    values: dict             # the full setting (key -> value)
    differs: dict            # key -> value, only the keys in which this task's settings differ
    runs: list[Run]

    @property
    def headline(self) -> dict:
        return {k: self.values.get(k) for k in HEADLINE}

    @property
    def label(self) -> str:
        return self.label_for({True: "deterministic", False: "stochastic"}.get(self.headline["deterministic"], "?"))

    def label_for(self, mode: str) -> str:
        h = self.headline
        return (f"{h['env_id'] or self.task}, ε = {_g(h['eps'])}, {h['frames']} frames, {mode} evaluation, "
                f"{h['episodes']} episodes, attacks: {', '.join(h['attacks']) or 'none'}")


def _g(x):
    return "?" if x is None else f"{x:g}" if isinstance(x, (int, float)) else str(x)


def settings(runs: list[Run]) -> list[Setting]:
    """Split runs into settings; within a task, ``differs`` names the keys whose values tell its
    settings apart (``eps``, ``frames``, ``deterministic``, ...), so no table mixes them silently."""
    by_task: dict[str, dict[str, list[Run]]] = defaultdict(dict)
    for r in runs:
        key = json.dumps(sorted(r.setting.items()), default=str)
        by_task[r.task].setdefault(key, []).append(r)
    out = []
    for task in sorted(by_task):
        groups = sorted(by_task[task].values(), key=lambda rs: str(rs[0].path))
        keys = sorted({k for rs in groups for k in rs[0].setting})
        varying = [k for k in keys if len({json.dumps(rs[0].setting.get(k, "<absent>"), default=str)
                                           for rs in groups}) > 1]
        # the headline keys first, in their order, then the rest alphabetically
        varying.sort(key=lambda k: (HEADLINE.index(k) if k in HEADLINE else len(HEADLINE), k))
        for i, rs in enumerate(groups):
            sid = task if len(groups) == 1 else f"{task}-{i + 1}"
            out.append(Setting(id=sid, task=task, values=dict(rs[0].setting),
                               differs={k: rs[0].setting.get(k, "<absent>") for k in varying}, runs=rs))
    return out
