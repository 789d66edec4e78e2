"""Evaluating a frozen policy clean and under attacks — for ``python -m prunerl evaluate`` and for the
adversarial-evaluation callback (one home: :func:`evaluate_policy`).

``python -m prunerl evaluate checkpoint=PATH [attacks=[...]] [episodes=N] [eps=E]`` rebuilds the
actor, critic and frozen normaliser from the checkpoint alone (its config travels in it), runs N
episodes clean and under each attack, prints a table and writes ``<checkpoint stem>.eval.json``
beside the checkpoint. ``checkpoint=DIR`` evaluates every ``*.ckpt`` in DIR.

The trained attacks are cached beside the victim's checkpoint, keyed by their settings and a
fingerprint of the victim's weights, so each is trained once per victim:
``<stem>.rs_q-<key>.pt`` (Robust Sarsa's Q) and ``<stem>.adversary-<key>/`` (the learned
adversary's own run directory, trained by ``fit`` with ``experiment=adversary``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from prunerl import attacks as A
from prunerl.config import ConfigError, load_checkpoint, resolve_device, validate_attack_settings
from prunerl.envs import TASKS, RunningNormalizer
from prunerl.evaluation import collect_transitions, run_episodes
from prunerl.models import Critic, GaussianActor

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _linear_shapes(state: dict, prefix: str) -> list[torch.Size]:
    return [v.shape for k, v in state.items() if k.startswith(prefix) and k.endswith(".weight")]


def actor_from_checkpoint(ckpt: dict) -> tuple[GaussianActor, dict, dict]:
    """(actor with the checkpoint's weights, normaliser state, run config) from a loaded checkpoint.

    Sizes come from the weights themselves (an adversary's actor acts on observations)."""
    cfg = ckpt["prunerl"]["config"]
    m = cfg["algo"]["model"]
    actor_state = {k[len("actor."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("actor.")}
    shapes = _linear_shapes(actor_state, "mean_net.")
    actor = GaussianActor(shapes[0][1], shapes[-1][0], tuple(m["hidden"]), m["activation"], m["sigma"], m["learn_std"])
    actor.load_state_dict(actor_state)
    dm_state = ckpt[ckpt["prunerl"]["datamodule_key"]]
    return actor, dm_state["normalizer"], cfg


def critic_from_checkpoint(ckpt: dict) -> Critic:
    """The victim's critic V(s) (state_dict keys ``critic.*``), for the value-guided attack."""
    m = ckpt["prunerl"]["config"]["algo"]["model"]
    state = {k[len("critic."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("critic.")}
    critic = Critic(_linear_shapes(state, "value_net.")[0][1], tuple(m["hidden"]), m["activation"])
    critic.load_state_dict(state)
    return critic


def attack_eps(settings, task: str) -> float:
    """ε of the attacks: ``eps`` if set, else the task's ε."""
    return float(TASKS[task].eps if settings.eps is None else settings.eps)


def _cache_key(victim: GaussianActor, **settings) -> str:
    from prunerl.data import weights_fingerprint

    blob = json.dumps({"victim": f"{weights_fingerprint(victim):.10e}", **settings}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def robust_sarsa_q(victim_path: Path, actor: GaussianActor, norm_state: dict, task: str, settings,
                   log=print) -> A.QNetwork:
    """Robust Sarsa's Q for this victim: loaded from the cache beside its checkpoint, or trained."""
    rs = OmegaConf.to_container(settings.rs, resolve=True) if isinstance(settings.rs, DictConfig) else dict(settings.rs)
    key = _cache_key(actor, task=task, seed=settings.seed, **rs)
    path = Path(victim_path).with_suffix(f".rs_q-{key}.pt")
    layers = _linear_shapes(actor.state_dict(), "mean_net.")
    obs_dim, act_dim = layers[0][1], layers[-1][0]
    if path.is_file():
        q = A.QNetwork(obs_dim, act_dim, hidden=tuple(rs["hidden"]))
        q.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["q"])
        return q.to(next(actor.parameters()).device)
    log(f"training Robust Sarsa Q on {rs['frames']} clean transitions  ->  {path.name}")
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        data = collect_transitions(actor, norm_state, task, rs["frames"], seed=settings.seed)
        q = A.QNetwork(obs_dim, act_dim, hidden=tuple(rs["hidden"])).to(data["observation"].device)
        history = A.train_robust_sarsa(q, actor, data, gamma=rs["gamma"], epochs=rs["epochs"],
                                       minibatches=rs["minibatches"], lr=rs["lr"], reg=rs["reg"],
                                       q_eps=rs["q_eps"], generator=gen)
    torch.save({"q": q.state_dict(), "settings": rs, "td_loss": history}, path)
    return q


def learned_adversary(victim_path: Path, actor: GaussianActor, task: str, eps: float, settings,
                      log=print) -> tuple[GaussianActor, RunningNormalizer]:
    """The learned adversary for this victim (and ε): from the cache beside its checkpoint, or
    trained by ``fit`` with ``experiment=adversary``. Returns its actor and frozen normaliser."""
    opt = settings.optimal
    key = _cache_key(actor, task=task, eps=eps, frames=opt.frames, similarity=opt.similarity, seed=opt.seed,
                     deterministic=settings.deterministic)
    run_dir = Path(victim_path).with_suffix(f".adversary-{key}")
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        from prunerl.fit import fit

        victim_ckpt = load_checkpoint(victim_path)
        experiment = OmegaConf.load(CONF_DIR / "experiment" / "adversary.yaml")
        experiment.pop("defaults", None)  # its group override (pruning: none) is applied by hand below
        cfg = OmegaConf.merge(OmegaConf.create(victim_ckpt["prunerl"]["config"]), experiment)
        if (CONF_DIR / "pruning" / "none.yaml").is_file():
            cfg.pruning = OmegaConf.load(CONF_DIR / "pruning" / "none.yaml")
        cfg.callbacks, cfg.logger, cfg.resume = {}, {}, None
        cfg.victim, cfg.run_dir = str(Path(victim_path).resolve()), str(run_dir)
        cfg.total_frames, cfg.seed = int(opt.frames), int(opt.seed)
        cfg.adversary.eps, cfg.adversary.similarity = eps, float(opt.similarity)
        cfg.adversary.victim_deterministic = bool(settings.deterministic)
        log(f"training the optimal adversary for {opt.frames} frames  ->  {run_dir.name}/")
        with torch.random.fork_rng(devices=[]):
            fit(cfg)
    adv, adv_norm_state, _ = actor_from_checkpoint(load_checkpoint(last))
    norm = RunningNormalizer(adv.mean_net[0].in_features, 1)
    norm.load_statistics(adv_norm_state)
    device = next(actor.parameters()).device
    return adv.to(device).eval(), norm.to(device).freeze()


def build_attack(name: str, *, actor: GaussianActor, critic: Critic | None, norm_state: dict, task: str,
                 eps: float, settings, generator: torch.Generator, victim_path: Path | None = None,
                 log=print) -> A.Perturbation:
    """The perturbation ``name`` for this victim (see :mod:`prunerl.attacks`)."""
    grad = dict(steps=settings.steps, step_size=settings.step_ratio * eps, random_start=settings.random_start,
                generator=generator)
    if name == "random":
        return A.random_attack(eps, generator)
    if name == "critic":
        return A.critic_attack(critic, eps, **grad)
    if name == "mad":
        return A.mad_attack(actor, actor.std, eps, **grad)
    if victim_path is None:
        raise ConfigError(f"the {name!r} attack trains a model and caches it beside a checkpoint; none was given")
    if name == "rs":
        return A.rs_attack(robust_sarsa_q(victim_path, actor, norm_state, task, settings, log), actor, eps, **grad)
    if name == "optimal":
        adv, adv_norm = learned_adversary(victim_path, actor, task, eps, settings, log)
        return A.optimal_attack(adv, eps, adv_norm.normalize)
    raise ConfigError(f"unknown attack {name!r}; allowed: {list(A.ATTACKS)}")


def evaluate_policy(actor: GaussianActor, critic: Critic | None, norm_state: dict, task: str, settings, *,
                    victim_path: Path | None = None, device: torch.device = torch.device("cpu"),
                    log=print) -> dict:
    """Clean and attacked returns of a frozen policy, ``settings.episodes`` episodes each.

    Every condition uses the same env seeds; the attacks draw from their own generator and the
    global torch RNG is restored afterwards (training RNG untouched: exact resume holds).
    """
    eps = attack_eps(settings, task)
    actor = actor.to(device).eval()
    critic = critic.to(device).eval() if critic is not None else None
    out = {"env": task, "eps": eps, "episodes": settings.episodes, "deterministic": bool(settings.deterministic),
           "steps": settings.steps, "step_size": settings.step_ratio * eps, "random_start": settings.random_start,
           "seed": settings.seed}
    run = dict(deterministic=settings.deterministic, seed=settings.seed, num_envs=settings.num_envs, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        out["clean"] = run_episodes(actor, norm_state, task, settings.episodes, **run)
        out["attacks"] = {}
        for i, name in enumerate(settings.attacks):
            gen = torch.Generator(device=device).manual_seed(settings.seed + 1 + i)
            perturb = build_attack(name, actor=actor, critic=critic, norm_state=norm_state, task=task, eps=eps,
                                   settings=settings, generator=gen, victim_path=victim_path, log=log)
            torch.manual_seed(settings.seed)
            t0 = time.perf_counter()
            out["attacks"][name] = run_episodes(actor, norm_state, task, settings.episodes, perturb=perturb, **run)
            out["attacks"][name]["wall_time_s"] = time.perf_counter() - t0
    out["clean_return"] = out["clean"]["mean_return"]
    out["attack_returns"] = {k: v["mean_return"] for k, v in out["attacks"].items()}
    return out


def format_table(result: dict) -> str:
    mode = "deterministic" if result["deterministic"] else "stochastic"
    c = result["clean"]
    lines = [f"{result['env']}  ε={result['eps']:g}  {result['episodes']} episodes ({mode})  "
             f"clean return {c['mean_return']:.1f} ± {c['std_return']:.1f}",
             f"{'attack':<9} {'return':>9} {'± std':>8} {'length':>7} {'‖ŝ−s‖∞':>8}"]
    for name, r in [("clean", result["clean"]), *result["attacks"].items()]:
        lines.append(f"{name:<9} {r['mean_return']:>9.1f} {r['std_return']:>8.1f} {r['mean_length']:>7.0f} "
                     f"{r['mean_perturbation_linf']:>8.4f}")
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
    expected_task = cfg.env.name if cfg.get("env") is not None else None
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.torch_threads)
    paths = _checkpoints(cfg.checkpoint)
    ckpts = [load_checkpoint(p) for p in paths]
    for p, ckpt in zip(paths, ckpts):
        run_cfg = ckpt["prunerl"]["config"]
        task = run_cfg["env"]["name"]
        if expected_task is not None and task != expected_task:
            raise ConfigError(f"checkpoint={p} is a checkpoint of env={task}, but env={expected_task} was asked for")
        if run_cfg.get("victim") is not None:
            raise ConfigError(f"checkpoint={p} is a learned adversary (trained against {run_cfg['victim']}), "
                              "not a policy to evaluate; evaluate its victim with attacks=[optimal]")
    results = {}
    for p, ckpt in zip(paths, ckpts):
        actor, norm_state, run_cfg = actor_from_checkpoint(ckpt)
        task = run_cfg["env"]["name"]
        t0 = time.perf_counter()
        result = evaluate_policy(actor, critic_from_checkpoint(ckpt), norm_state, task, cfg, victim_path=p,
                                 device=device)
        out = {"checkpoint": str(p.resolve()), "frames_trained": ckpt["prunerl"]["frames"], **result,
               "wall_time_s": time.perf_counter() - t0}
        json_path = p.with_suffix(".eval.json")
        json_path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"{p}\n{format_table(result)}\n  ->  {json_path}")
        results[str(p)] = out
    return results if len(results) > 1 else next(iter(results.values()))
