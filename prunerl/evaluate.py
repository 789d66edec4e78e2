"""Evaluating a frozen policy clean and under attacks — for ``python -m prunerl evaluate`` and for the
adversarial-evaluation callback (one home: :func:`evaluate_policy`).

``python -m prunerl evaluate checkpoint=PATH [attacks=[...]] [episodes=N] [eps=E]`` rebuilds the
actor, critic and frozen normaliser from the checkpoint alone (its config travels in it), runs N
episodes (50 by default, as the SA-PPO reference) clean and under each attack, with μ(ŝ) and, by
default, also with sampled actions; prints a table and writes ``<checkpoint stem>.eval.json``
beside the checkpoint. ``checkpoint=DIR`` evaluates every ``*.ckpt`` in DIR.

Every table reports the paper's robust figures: ``robust_return`` (the worst attack) and
``robust_return_avg`` (the mean over attacks). Robust Sarsa reports the strongest Q of its
(ε_Q, reg) scan, each pair's return under ``rs_scan``; the learned adversary the strongest of its
seeds, each under ``optimal_scan``. The trained attacks (Robust Sarsa's Qs,
the learned adversary) are trained once per victim and cached beside its checkpoint
(:mod:`prunerl.trained_attacks`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from prunerl import atomic
from prunerl import attacks as A
from prunerl.checkpoint import actor_from_checkpoint, critic_from_checkpoint, load_checkpoint
from prunerl.config import ConfigError, _positive_int, resolve_device, validate_attack_settings
from prunerl.envs import DEFAULT_ENGINE, ENGINES, TASKS
from prunerl.evaluation import run_episodes
from prunerl.models import Critic, GaussianActor
from prunerl.trained_attacks import learned_adversaries, robust_sarsa_qs


def attack_eps(settings, task: str, run_eps: float | None = None) -> float:
    """ε of the attacks: ``eps`` if set, else the run's own ``env.eps`` (the ε its SA ball and its
    certified bound use), else the task's registered ε."""
    if settings.eps is not None:
        return float(settings.eps)
    return float(TASKS[task].eps if run_eps is None else run_eps)


def robust_figures(clean_return: float, attack_returns: dict[str, float]) -> dict:
    """The paper's robust figures of one table: the worst attack's return (``robust_return``,
    named by ``robust_attack``) and the mean over attacks (``robust_return_avg``); None without
    attacks."""
    if not attack_returns:
        return {"robust_return": None, "robust_attack": None, "robust_return_avg": None}
    worst = min(attack_returns, key=attack_returns.get)
    return {"robust_return": attack_returns[worst], "robust_attack": worst,
            "robust_return_avg": float(np.mean(list(attack_returns.values())))}


def _trained_models(settings, *, actor: GaussianActor, norm_state: dict, task: str, eps: float,
                    victim_path: Path | None, log, engine: str = DEFAULT_ENGINE) -> dict:
    """Robust Sarsa's Qs and the learned adversary, trained (or loaded from their cache) before any
    rollout, once for every mode of evaluation."""
    needed = [a for a in settings.attacks if a in A.TRAINED_ATTACKS]
    if needed and victim_path is None:
        raise ConfigError(f"the {needed[0]!r} attack trains a model and caches it beside a checkpoint; "
                          "none was given")
    models = {}
    if "rs" in needed:
        models["rs"] = robust_sarsa_qs(victim_path, actor, norm_state, task, settings, log, engine=engine)
    if "optimal" in needed:
        models["optimal"] = learned_adversaries(victim_path, actor, task, eps, settings, log)
    return models


def _rollouts(actor: GaussianActor, critic: Critic | None, norm_state: dict, task: str, settings, eps: float,
              models: dict, deterministic: bool, device: torch.device, engine: str = DEFAULT_ENGINE) -> dict:
    """One table: ``settings.episodes`` episodes clean and under each attack, actions μ(ŝ)
    (``deterministic``) or sampled. Robust Sarsa runs once per Q of its scan; the lowest return
    is ``rs``, every pair's is in ``rs_scan``. Every condition starts from the same env seeds and
    the same torch seed (sampled actions), and each attack draws from its own generator."""
    run = dict(deterministic=deterministic, seed=settings.seed, num_envs=settings.num_envs, device=device,
               engine=engine)

    def rollout(perturb=None) -> dict:
        torch.manual_seed(settings.seed)
        t0 = time.perf_counter()
        result = run_episodes(actor, norm_state, task, settings.episodes, perturb=perturb, **run)
        result["wall_time_s"] = time.perf_counter() - t0
        return result

    out = {"deterministic": deterministic, "clean": rollout(), "attacks": {}}
    for i, name in enumerate(settings.attacks):
        def grad():  # a fresh generator per rollout: each is reproducible on its own
            return dict(steps=settings.steps, step_size=settings.step_ratio * eps,
                        random_start=settings.random_start,
                        generator=torch.Generator(device=device).manual_seed(settings.seed + 1 + i))

        if name == "random":
            out["attacks"][name] = rollout(A.random_attack(eps, grad()["generator"]))
        elif name == "critic":
            out["attacks"][name] = rollout(A.critic_attack(critic, eps, **grad()))
        elif name == "mad":
            out["attacks"][name] = rollout(A.mad_attack(actor, actor.std, eps, **grad()))
        elif name == "optimal":  # one learned adversary per seed; the strongest is `optimal`
            scan = [{"seed": seed, **rollout(A.optimal_attack(adv, eps, adv_norm.normalize))}
                    for seed, adv, adv_norm in models["optimal"]]
            out["attacks"][name] = min(scan, key=lambda r: r["mean_return"])
            out["optimal_scan"] = [{"seed": r["seed"], "return": r["mean_return"], "std_return": r["std_return"]}
                                   for r in scan]
        elif name == "rs":  # one Q per (ε_Q, reg) pair; the strongest is `rs`
            scan = [{"q_eps": q_eps, "reg": reg, **rollout(A.rs_attack(q, actor, eps, **grad()))}
                    for q_eps, reg, q in models["rs"]]
            out["attacks"][name] = min(scan, key=lambda r: r["mean_return"])
            out["rs_scan"] = [{"q_eps": r["q_eps"], "reg": r["reg"], "return": r["mean_return"],
                               "std_return": r["std_return"]} for r in scan]
        else:
            raise ConfigError(f"unknown attack {name!r}; allowed: {list(A.ATTACKS)}")
    out["clean_return"] = out["clean"]["mean_return"]
    out["attack_returns"] = {k: v["mean_return"] for k, v in out["attacks"].items()}
    out.update(robust_figures(out["clean_return"], out["attack_returns"]))
    return out


def evaluate_policy(actor: GaussianActor, critic: Critic | None, norm_state: dict, task: str, settings, *,
                    victim_path: Path | None = None, device: torch.device = torch.device("cpu"),
                    log=print, run_eps: float | None = None, engine: str = DEFAULT_ENGINE) -> dict:
    """Clean and attacked returns of a frozen policy, ``settings.episodes`` episodes each.

    The primary table uses ``settings.deterministic`` (a = μ(ŝ) or sampled); with
    ``settings.stochastic`` every condition is also rolled out with sampled actions, under
    ``evaluation_stochastic`` (the same figures; when the primary table is already stochastic it
    is that table). Robust Sarsa and the learned adversary are trained once for both. Every
    condition uses the same env seeds; the attacks draw from their own generators and the global
    torch RNG is restored afterwards (training RNG untouched: exact resume holds). The envs run on
    ``engine`` (the run's ``env.engine``; the engines are bit-identical, so the figures do not
    depend on it). A learned adversary trains on the engine of the victim's config.
    """
    eps = attack_eps(settings, task, run_eps)
    actor = actor.to(device).eval()
    critic = critic.to(device).eval() if critic is not None else None
    stochastic = bool(settings.get("stochastic", False))
    out = {"env": task, "eps": eps, "episodes": settings.episodes, "deterministic": bool(settings.deterministic),
           "stochastic": stochastic, "steps": settings.steps, "step_size": settings.step_ratio * eps,
           "random_start": settings.random_start, "seed": settings.seed}
    with torch.random.fork_rng(devices=[]):
        models = _trained_models(settings, actor=actor, norm_state=norm_state, task=task, eps=eps,
                                 victim_path=victim_path, log=log, engine=engine)
        primary = _rollouts(actor, critic, norm_state, task, settings, eps, models, bool(settings.deterministic),
                            device, engine)
        if stochastic:
            out["evaluation_stochastic"] = (primary if not settings.deterministic else
                                            _rollouts(actor, critic, norm_state, task, settings, eps, models,
                                                      False, device, engine))
    primary.pop("deterministic")
    out.update(primary)
    for scan in ("rs_scan", "optimal_scan"):
        if scan in out and stochastic:
            for row, srow in zip(out[scan], out["evaluation_stochastic"][scan]):
                row["stochastic_return"] = srow["return"]
    return out


def format_table(result: dict) -> str:
    """The evaluation as a table: one row per condition, the primary mode's return ± std, the
    stochastic return when recorded, then the robust rows (worst attack, mean over attacks), Robust
    Sarsa's scan and the learned adversaries' seeds."""
    mode = "deterministic" if result["deterministic"] else "stochastic"
    sto = result.get("evaluation_stochastic")
    both = sto is not None and result["deterministic"]
    c = result["clean"]
    head = f"{result['env']}  ε={result['eps']:g}  {result['episodes']} episodes ({mode}"
    head += " and stochastic)" if both else ")"
    lines = [f"{head}  clean return {c['mean_return']:.1f} ± {c['std_return']:.1f}",
             f"{'attack':<9} {'return':>9} {'± std':>8}" + (f" {'stochastic':>11} {'± std':>8}" if both else "")
             + f" {'length':>7} {'‖ŝ−s‖∞':>8}"]
    for name, r in [("clean", result["clean"]), *result["attacks"].items()]:
        s = sto["clean"] if name == "clean" and both else (sto["attacks"][name] if both else None)
        lines.append(f"{name:<9} {r['mean_return']:>9.1f} {r['std_return']:>8.1f}"
                     + (f" {s['mean_return']:>11.1f} {s['std_return']:>8.1f}" if s else "")
                     + f" {r['mean_length']:>7.0f} {r['mean_perturbation_linf']:>8.4f}")
    if result["attacks"]:
        for label, key in (("robust", "robust_return"), ("avg", "robust_return_avg")):
            line = f"{label:<9} {result[key]:>9.1f} {'':>8}" + (f" {sto[key]:>11.1f} {'':>8}" if both else "")
            lines.append(line + ("   (worst attack: " + result["robust_attack"] +
                                 (f"; stochastic: {sto['robust_attack']}" if both else "") + ")"
                                 if key == "robust_return" else "   (mean over attacks)"))
    for row in result.get("rs_scan", []):
        lines.append(f"  rs scan  ε_Q={row['q_eps']:<5g} reg={row['reg']:<5g} {row['return']:>9.1f}"
                     + (f" {row['stochastic_return']:>20.1f}" if both else ""))
    for row in result.get("optimal_scan", []):
        lines.append(f"  optimal  seed {row['seed']:<15} {row['return']:>9.1f}"
                     + (f" {row['stochastic_return']:>20.1f}" if both else ""))
    return "\n".join(lines)


def _checkpoints(path) -> list[Path]:
    p = Path(str(path)).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.ckpt"))
        if not found:
            raise ConfigError(f"checkpoint={path} is a directory without *.ckpt files")
        return found
    return [p]


def evaluate(cfg: DictConfig) -> dict:
    """``python -m prunerl evaluate``: every check first, then one evaluation per checkpoint."""
    if cfg.checkpoint is None:
        raise ConfigError("checkpoint=PATH is required (e.g. checkpoint=outputs/.../checkpoints/last.ckpt)")
    validate_attack_settings(cfg)
    _positive_int("torch_threads", cfg.torch_threads)
    expected_task = cfg.env.name if cfg.get("env") is not None else None
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.torch_threads)
    paths = _checkpoints(cfg.checkpoint)
    ckpts = [load_checkpoint(p) for p in paths]
    for p, ckpt in zip(paths, ckpts):
        run_cfg = ckpt["prunerl"].get("config")
        if not isinstance(run_cfg, dict) or not all(isinstance(run_cfg.get(k), dict) for k in ("env", "algo")):
            raise ConfigError(f"checkpoint={p} holds no run config with env and algo (written by an older "
                              "PruneRL?); expected a .ckpt written by `python -m prunerl fit`")
        task = run_cfg["env"]["name"]
        if expected_task is not None and task != expected_task:
            raise ConfigError(f"checkpoint={p} is a checkpoint of env={task}, but env={expected_task} was asked for")
        engine = run_cfg["env"].get("engine", DEFAULT_ENGINE)   # absent before env.engine: the default
        if engine not in ENGINES:
            raise ConfigError(f"checkpoint={p} was written with env.engine={engine!r}; allowed: {list(ENGINES)}")
        if run_cfg.get("victim") is not None:
            raise ConfigError(f"checkpoint={p} is a learned adversary (trained against {run_cfg['victim']}), "
                              "not a policy to evaluate; evaluate its victim with attacks=[optimal]")
    results = {}
    for p, ckpt in zip(paths, ckpts):
        actor, norm_state, run_cfg = actor_from_checkpoint(ckpt)
        task = run_cfg["env"]["name"]
        t0 = time.perf_counter()
        result = evaluate_policy(actor, critic_from_checkpoint(ckpt), norm_state, task, cfg, victim_path=p,
                                 device=device, run_eps=run_cfg["env"].get("eps"),
                                 engine=run_cfg["env"].get("engine", DEFAULT_ENGINE))
        out = {"checkpoint": str(p.resolve()), "frames_trained": ckpt["prunerl"]["frames"], **result,
               "wall_time_s": time.perf_counter() - t0}
        json_path = p.with_suffix(".eval.json")
        atomic.write_text(json_path, json.dumps(out, indent=2) + "\n")
        print(f"{p}\n{format_table(result)}\n  ->  {json_path}")
        results[str(p)] = out
    return results if len(results) > 1 else next(iter(results.values()))
