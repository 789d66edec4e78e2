"""The attacks that first train a model against their victim, trained once per victim and cached
beside its checkpoint, keyed by their settings and a fingerprint of the victim's weights:

- Robust Sarsa (``rs``): one Q(s, a) per (ε_Q, reg) pair of ``evaluation.rs.scan`` (SA-PPO's
  authors scan 30 pairs and report the lowest return; :func:`robust_sarsa_qs`), cached as
  ``<stem>.rs_q-<key>.pt``. The pairs share one set of clean victim transitions.
- the learned "optimal" adversary (``optimal``): one per seed of ``evaluation.optimal.seeds``,
  each an ordinary ``fit`` run with ``experiment=adversary`` against the frozen victim
  (:func:`learned_adversaries`); the strongest is reported (a PPO adversary's strength at CPU
  budgets depends much on its seed). Its run directory ``<stem>.adversary-<key>/`` is the cache
  (with its training curve, ``adversary_curve.png``).

This module sits above ``fit`` (it calls it) and below ``evaluate``; ``fit`` reads checkpoints
through :mod:`prunerl.checkpoint`, so nothing here makes an import circle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from prunerl import atomic
from prunerl import attacks as A
from prunerl.checkpoint import actor_from_checkpoint, frozen_normalizer, linear_shapes, load_checkpoint
from prunerl.data import weights_fingerprint
from prunerl.envs import DEFAULT_ENGINE, RunningNormalizer
from prunerl.evaluation import collect_transitions
from prunerl.fit import fit
from prunerl.models import GaussianActor
from prunerl.preemption import Interrupted
from prunerl.rundir import read_summary

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
#: bumped when a cached model's training changes meaning (2: Sarsa's target uses the next action
#: taken, a', not μ(s')), so that models cached by an older version are retrained, not reused
RS_VERSION = 3   # 3: each Q initialised from the seed alone (it was drawn from whatever state torch's RNG was in)


def cache_key(victim: GaussianActor, **settings) -> str:
    """A short hash of the victim's weights and the settings a trained attack depends on."""
    blob = json.dumps({"victim": f"{weights_fingerprint(victim):.10e}", **settings}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _plain(x) -> dict:
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else dict(x)


def rs_scan_pairs(rs) -> list[tuple[float, float]]:
    """The (ε_Q, reg) pairs of ``evaluation.rs.scan``."""
    return [(float(q_eps), float(reg)) for q_eps, reg in rs["scan"]]


def robust_sarsa_qs(victim_path: Path, actor: GaussianActor, norm_state: dict, task: str, settings,
                    log=print, engine: str = DEFAULT_ENGINE) -> list[tuple[float, float, A.QNetwork]]:
    """One Robust Sarsa Q per (ε_Q, reg) pair of ``settings.rs.scan``, as (ε_Q, reg, Q):
    loaded from the cache beside the victim's checkpoint, or trained (on transitions collected
    once for all missing pairs, with the same seed)."""
    rs = _plain(settings.rs)
    shared = {k: rs[k] for k in ("frames", "epochs", "minibatches", "lr", "gamma", "hidden")}
    layers = linear_shapes(actor.state_dict(), "mean_net.")
    obs_dim, act_dim = layers[0][1], layers[-1][0]
    device = next(actor.parameters()).device
    out, data = [], None
    for q_eps, reg in rs_scan_pairs(rs):
        key = cache_key(actor, task=task, seed=settings.seed, version=RS_VERSION, q_eps=q_eps, reg=reg, **shared)
        path = Path(victim_path).with_suffix(f".rs_q-{key}.pt")
        if path.is_file():
            q = A.QNetwork(obs_dim, act_dim, hidden=tuple(rs["hidden"]))
            q.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["q"])
            out.append((q_eps, reg, q.to(device)))
            continue
        log(f"training Robust Sarsa Q (ε_Q={q_eps:g}, reg={reg:g}) on {rs['frames']} clean transitions  ->  "
            f"{path.name}")
        with torch.random.fork_rng(devices=[]):
            if data is None:
                torch.manual_seed(settings.seed)
                data = collect_transitions(actor, norm_state, task, rs["frames"], seed=settings.seed, engine=engine)
            # each Q's initial weights and training from the seed alone: not from what used torch's
            # RNG before (a fit's callback vs the evaluate command), nor from which pairs were cached
            torch.manual_seed(settings.seed)
            q = A.QNetwork(obs_dim, act_dim, hidden=tuple(rs["hidden"])).to(device)
            history = A.train_robust_sarsa(q, data, gamma=rs["gamma"], epochs=rs["epochs"],
                                           minibatches=rs["minibatches"], lr=rs["lr"], reg=reg, q_eps=q_eps,
                                           generator=torch.Generator().manual_seed(settings.seed))
        atomic.torch_save({"q": q.state_dict(), "settings": {**shared, "q_eps": q_eps, "reg": reg, "version": RS_VERSION},
                    "td_loss": history}, path)
        out.append((q_eps, reg, q))
    return out


def adversary_config(victim_path: Path, eps: float, settings, seed: int) -> DictConfig:
    """The ``fit`` config of a learned adversary against ``victim_path``: the victim's own config
    (task, activation, env settings), overlaid by ``conf/experiment/adversary.yaml`` (the adversary's
    PPO settings) and then by ``settings.optimal`` (frames, similarity) and ``seed``. ``victim`` and
    ``run_dir`` are left for the caller to set (they do not change what is trained)."""
    opt = settings.optimal
    victim_ckpt = load_checkpoint(victim_path)
    experiment = OmegaConf.load(CONF_DIR / "experiment" / "adversary.yaml")
    experiment.pop("defaults", None)  # its group override (pruning: none) is applied by hand below
    cfg = OmegaConf.merge(OmegaConf.create(victim_ckpt["prunerl"]["config"]), experiment)
    cfg.pruning = OmegaConf.load(CONF_DIR / "pruning" / "none.yaml")
    # only the adversary's own callbacks (its training curve); none of the victim's
    cfg.callbacks = {k: v for k, v in experiment.get("callbacks", {}).items() if v is not None}
    cfg.logger, cfg.resume = {}, None
    cfg.evaluation = None  # the adversary is not evaluated; the victim's (maybe older) settings are not checked
    cfg.victim, cfg.run_dir = None, None
    cfg.total_frames, cfg.seed = int(opt.frames), int(seed)
    cfg.adversary.eps, cfg.adversary.similarity = eps, float(opt.similarity)
    cfg.adversary.victim_deterministic = bool(settings.deterministic)
    return cfg


def _finished(run_dir: Path) -> bool:
    """A cached adversary is one whose training finished (not one cut by a preemption)."""
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return False
    try:
        return read_summary(run_dir).get("status", "finished") == "finished"
    except (OSError, ValueError):
        return False


def learned_adversaries(victim_path: Path, actor: GaussianActor, task: str, eps: float, settings,
                        log=print) -> list[tuple[int, GaussianActor, RunningNormalizer]]:
    """The learned adversaries for this victim (and ε), one per seed of ``settings.optimal.seeds``,
    as (seed, actor, frozen normaliser): each from the cache beside the victim's checkpoint, or
    trained by ``fit`` with ``experiment=adversary``. A seed whose training diverged is left out,
    with a warning (re-running it would diverge the same way; it is not requeued as a preemption);
    :class:`AdversaryDiverged` when all did."""
    out, failed = [], []
    for seed in settings.optimal.seeds:
        cfg = adversary_config(victim_path, eps, settings, int(seed))
        # keyed by the whole adversary config (conf/experiment/adversary.yaml and evaluation.optimal)
        key = cache_key(actor, config=OmegaConf.to_container(cfg, resolve=True))
        run_dir = Path(victim_path).with_suffix(f".adversary-{key}")
        last = run_dir / "checkpoints" / "last.ckpt"
        if not _finished(run_dir):
            # resume=auto: an adversary whose training was cut (preemption, crash) continues in place
            cfg.victim, cfg.run_dir, cfg.resume = str(Path(victim_path).resolve()), str(run_dir), "auto"
            log(f"training the optimal adversary (seed {seed}) for {cfg.total_frames} frames  ->  {run_dir.name}/")
            with torch.random.fork_rng(devices=[]):
                s = fit(cfg)
            if s.get("status") == "diverged":   # retraining would diverge the same way: not a preemption
                log(f"warning: the optimal adversary (seed {seed}) diverged ({s.get('error')}); "
                    f"it is left out of the optimal attack — see {run_dir}/summary.json")
                failed.append(f"seed {seed}: {s.get('diverged_term')} at update {s.get('diverged_at_update')}")
                continue
            if s.get("status") != "finished":   # its own preemption handler caught the signal
                raise Interrupted(s.get("interrupted_by") or str(s.get("status")))
        adv, adv_norm_state, _ = actor_from_checkpoint(load_checkpoint(last))
        device = next(actor.parameters()).device
        out.append((int(seed), adv.to(device).eval(), frozen_normalizer(adv_norm_state).to(device)))
    if not out:
        raise AdversaryDiverged(f"every learned adversary diverged ({'; '.join(failed)}), so the 'optimal' attack "
                                "has no model; drop it from the attacks or change evaluation.optimal (seeds, frames)")
    return out


class AdversaryDiverged(RuntimeError):
    """No learned adversary of ``evaluation.optimal.seeds`` trained without diverging."""
