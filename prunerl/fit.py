"""``python -m prunerl fit``: assemble env, models, module, collector, callbacks and Trainer.

``fit(cfg)`` is a plain function returning the run's summary (STYLE.md: the Hydra wrapper is
thin, tests call ``fit`` on a composed config).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from prunerl.atomic import AtomicCheckpointIO
from prunerl.checkpoint import actor_from_checkpoint, load_checkpoint
from prunerl.config import ConfigError, resolve_device, validate_fit
from prunerl.data import RolloutDataModule
from prunerl.envs import DEFAULT_ENGINE, TASKS, make_env
from prunerl.models import Critic, GaussianActor
from prunerl.module import PPOModule
from prunerl.preemption import Preemption
from prunerl.rundir import MetricsLogger, RunDir, RunDirBusy, read_summary


def build_models(cfg: DictConfig, obs_dim: int, act_dim: int) -> tuple[GaussianActor, Critic]:
    m = cfg.algo.model
    actor = GaussianActor(obs_dim, act_dim, tuple(m.hidden), m.activation, m.sigma, m.learn_std)
    critic = Critic(obs_dim, tuple(m.hidden), m.activation)
    return actor, critic


def build_env(cfg: DictConfig):
    """The training env for ``cfg``: the batched MuJoCo task with its normaliser — or, with
    ``victim=PATH`` (``experiment=adversary``), the env whose agent is a learned adversary
    perturbing that frozen victim's observations (:mod:`prunerl.adversary`)."""
    if cfg.get("victim") is not None:
        from prunerl.adversary import make_adversary_env

        victim, victim_norm, _ = actor_from_checkpoint(load_checkpoint(cfg.victim, key="victim"))
        adv = cfg.adversary
        eps = float(cfg.env.eps if adv.eps is None else adv.eps)
        return make_adversary_env(cfg.env.name, victim, victim_norm, cfg.env.num_envs, cfg.seed, eps=eps,
                                  similarity=adv.similarity, victim_deterministic=adv.victim_deterministic,
                                  gamma=cfg.algo.gamma, clip_obs=cfg.env.clip_obs,
                                  scale_reward=cfg.env.scale_reward, engine=cfg.env.get("engine", DEFAULT_ENGINE))
    return make_env(cfg.env.name, cfg.env.num_envs, cfg.seed, gamma=cfg.algo.gamma,
                    clip_obs=cfg.env.clip_obs, scale_reward=cfg.env.scale_reward,
                    threads=cfg.env.get("threads", 1), engine=cfg.env.get("engine", DEFAULT_ENGINE))


def task_eps(cfg: DictConfig) -> float:
    """ε of the SA ball: ``algo.sa.eps`` if set, else the task's ε."""
    return float(cfg.env.eps if cfg.algo.sa.eps is None else cfg.algo.sa.eps)


def _use_wandb_offline_without_key(cfg: DictConfig) -> None:
    if "wandb" in (cfg.logger or {}) and "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.exists() and "api.wandb.ai" in netrc.read_text()):
            os.environ["WANDB_MODE"] = "offline"


def weight_sparsity(module: torch.nn.Module) -> float:
    """Fraction of exactly-zero entries over the weight matrices of ``module``'s Linear layers."""
    ws = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / total if total else 0.0


def _finished_run(cfg: DictConfig, run: RunDir) -> dict | None:
    """``skip_finished=true`` (resumable sweeps): the summary of the finished run already in the run
    dir — refused if that run's config differs — or None after moving an unfinished one aside.
    "The same run" is the report's definition (:func:`prunerl.runset.run_config`), so a skipped run
    is exactly one the report would count once."""
    from prunerl.runset import run_config

    if not (run.path / "summary.json").is_file() or read_summary(run.path).get("status") == "interrupted":
        moved = run.move_aside()
        print(f"{run.path} held an unfinished run; moved it to {moved} and starting again", flush=True)
        return None
    saved = yaml.safe_load((run.path / "config.yaml").read_text()) if (run.path / "config.yaml").is_file() else {}
    there, now = run_config(saved or {}), run_config(OmegaConf.to_container(cfg, resolve=True))
    diff = [(k, there.get(k, "<absent>"), now.get(k, "<absent>")) for k in sorted(set(there) | set(now))
            if there.get(k, "<absent>") != now.get(k, "<absent>")]
    if diff:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:5])
        raise ConfigError(f"hydra.run.dir={run.path} holds a finished run of another config ({shown}); "
                          "skip_finished only skips the same run — delete it or choose another directory")
    print(f"skip: {run.path} already finished (skip_finished=true)", flush=True)
    return {**read_summary(run.path), "skipped": True}


def fit(cfg: DictConfig) -> dict:
    """Train as ``cfg`` says; write the run directory; return ``summary.json``'s content.

    The run dir is locked while this runs (:meth:`RunDir.lock`): a second ``fit`` into it is
    refused — with ``skip_finished`` (sweeps), skipped as in progress elsewhere."""
    validate_fit(cfg)
    device = resolve_device(cfg.device)
    run = RunDir(cfg.run_dir)
    # refusals and skips that need no lock come first: they write nothing (not even the lock file)
    if run.existing_run():
        if not cfg.get("skip_finished"):
            _refuse_existing(run)
        if (run.path / "summary.json").is_file() and read_summary(run.path).get("status") != "interrupted":
            return _finished_run(cfg, run)
    try:
        with run.lock():
            return _fit(cfg, run, device)
    except RunDirBusy as e:
        if not cfg.get("skip_finished"):
            raise
        print(f"skip: {run.path} is being trained by another fit ({e})", flush=True)
        return {"skipped": True, "busy": True, "run_dir": str(run.path)}


def _refuse_existing(run: RunDir) -> None:
    raise ConfigError(f"hydra.run.dir={run.path} already holds a run ({', '.join(run.existing_run())}); "
                      "choose a new directory (resume=PATH writes its continuation to a new one)")


def _fit(cfg: DictConfig, run: RunDir, device: torch.device) -> dict:
    if cfg.get("skip_finished") and run.existing_run():
        finished = _finished_run(cfg, run)
        if finished is not None:
            return finished
    if run.existing_run():
        _refuse_existing(run)
    # Lightning's start-up chatter (accelerator lines, tips) drowns the progress bar.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    torch.set_num_threads(cfg.torch_threads)
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    _use_wandb_offline_without_key(cfg)

    # Create the env and the models (their sizes come from the env: an adversary acts on observations)
    task = TASKS[cfg.env.name]
    algo = cfg.algo
    env = build_env(cfg)
    obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    actor, critic = build_models(cfg, obs_dim, act_dim)
    actor.to(device), critic.to(device)

    # Create the collector's datamodule and the PPO+SA module
    dm = RolloutDataModule(
        env, actor, critic, frames_per_batch=algo.frames_per_batch, epochs=algo.epochs,
        minibatches=algo.minibatches, gamma=algo.gamma, lmbda=algo.gae_lambda, seed=cfg.seed,
        device=device,
    )
    n_rollouts = math.ceil(cfg.total_frames / algo.frames_per_batch)
    module = PPOModule(
        actor, critic, total_updates=n_rollouts * dm.updates_per_rollout, lr=algo.lr,
        adam_eps=algo.adam_eps, clip=algo.clip, vf_coef=algo.vf_coef, ent_coef=algo.ent_coef,
        max_grad_norm=algo.max_grad_norm, normalize_advantage=algo.normalize_advantage,
        kappa=algo.kappa, eps=task_eps(cfg), sa_steps=algo.sa.steps, sa_step_ratio=algo.sa.step_ratio,
        eps_ramp=algo.sa.eps_ramp, anneal_lr=bool(algo.get("anneal_lr", False)),
        updates_per_rollout=dm.updates_per_rollout,
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)

    # Create loggers and callbacks (named _target_ mappings; null entries are dropped)
    run.write_config(cfg)
    loggers = [MetricsLogger(run.path)]
    loggers += [hydra.utils.instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    preemption = Preemption()  # SIGTERM/SIGINT/SIGUSR1: finish the rollout, checkpoint, stop
    callbacks.append(preemption)
    callbacks.append(ModelCheckpoint(
        dirpath=run.checkpoints, filename="rollout{epoch:05d}-t{step}",
        every_n_epochs=cfg.checkpoint.every_n_rollouts or 0,  # null: no periodic ones, only last.ckpt
        save_on_train_epoch_end=True, save_top_k=-1, save_last=True, auto_insert_metric_name=False,
    ))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, accelerator="gpu" if device.type == "cuda" else "cpu", max_epochs=n_rollouts,
        logger=loggers, callbacks=callbacks, default_root_dir=str(run.path),
        plugins=[AtomicCheckpointIO()],  # every checkpoint written whole or not at all
        enable_progress_bar=any(type(c).__name__.endswith("ProgressBar") for c in callbacks),
    )

    # Train
    t0 = time.perf_counter()
    frames0 = 0
    if cfg.resume is not None:
        frames0 = torch.load(cfg.resume, map_location="cpu", weights_only=False)[
            "prunerl"]["frames"]
    # weights_only=False: our checkpoints hold numpy RNG states and env physics (our own files)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.resume, weights_only=False)
    wall = time.perf_counter() - t0
    trainer.save_checkpoint(run.checkpoints / "last.ckpt", weights_only=False)

    summary = {
        "frames": dm.frames,
        "wall_time_s": wall,
        "sps": (dm.frames - frames0) / wall,
        "collect_time_s": dm.collect_time,
        "updates": trainer.global_step,
        "train_return": dm.train_return,
        "episodes": dm.episodes,
        "clean_return": None,
        "attack_returns": {},
        "sparsity": {"global": weight_sparsity(torch.nn.ModuleList([actor, critic])),
                     "actor": weight_sparsity(actor), "critic": weight_sparsity(critic)},
        "lipschitz_surrogate": None,
        "certified_bound": None,
        "seed": cfg.seed,
        "env": cfg.env.name,
        "env_id": task.env_id,
        "eps": task_eps(cfg),
        "kappa": algo.kappa,
        "pruning_method": "none",
        "final_sparsity": 0.0,
        "device": str(device),
        "resumed_from": cfg.resume,
        "status": "finished",
    }
    for extra in trainer.callbacks:  # callbacks may add their figures (pruning, Lipschitz, eval)
        if hasattr(extra, "summary"):
            summary.update(extra.summary(trainer, module))
    if preemption.interrupted is not None:
        # not a finished run: no evaluation figures (an earlier periodic one is in metrics.jsonl)
        summary.update(status="interrupted", interrupted_by=preemption.interrupted, clean_return=None,
                       attack_returns={}, resume=str(run.checkpoints / "last.ckpt"))
        for k in ("robust_return", "robust_return_avg", "evaluation", "evaluation_stochastic"):
            summary.pop(k, None)
    run.write_summary(summary)
    return summary
