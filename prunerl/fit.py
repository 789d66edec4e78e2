"""``python -m prunerl fit``: assemble env, models, module, collector, callbacks and Trainer.

``fit(cfg)`` is a plain function returning the run's summary (STYLE.md: the Hydra wrapper is
thin, tests call ``fit`` on a composed config).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from prunerl.atomic import AtomicCheckpointIO
from prunerl.checkpoint import actor_from_checkpoint, load_checkpoint
from prunerl.config import ConfigError, resolve_device, validate_fit
from prunerl.data import RolloutDataModule
from prunerl.divergence import Diverged, DivergenceGuard
from prunerl.envs import DEFAULT_ENGINE, TASKS, make_env
from prunerl.models import Critic, GaussianActor
from prunerl.module import PPOModule
from prunerl.preemption import FinalCheckpoint, Preemption, TimedCheckpoint
from prunerl.rundir import (MetricsLogger, RunDir, RunDirBusy, continue_logs, newest_checkpoint, read_summary,
                            resume_checkpoint)
from prunerl.runset import run_config_diff


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
    """W&B runs offline when there is no key, and falls back to offline (with a warning) when
    online mode cannot reach the server, instead of blocking the run on retries."""
    if "wandb" not in (cfg.logger or {}) or cfg.logger.wandb is None:
        return
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.exists() and "api.wandb.ai" in netrc.read_text()):
            os.environ["WANDB_MODE"] = "offline"
            return
    if os.environ.get("WANDB_MODE", "online") == "online":
        url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        why = unreachable(url, timeout=float(cfg.get("wandb_probe_timeout_s", 5.0)))
        if why is not None:
            warnings.warn(f"W&B: cannot reach {url} ({why}); logging offline instead — upload later with "
                          f"`wandb sync {cfg.run_dir}/wandb/offline-run-*`", stacklevel=2)
            print(f"warning: W&B cannot reach {url} ({why}); this run logs offline", flush=True)
            os.environ["WANDB_MODE"] = "offline"


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why a TCP connection to ``url``'s host cannot be opened within ``timeout`` s, or None if it can."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


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
    if not (run.path / "summary.json").is_file() or read_summary(run.path).get("status") == "interrupted":
        return None
    diff = run_config_diff(run.path, OmegaConf.to_container(cfg, resolve=True))
    if diff:
        raise ConfigError(f"hydra.run.dir={run.path} holds a finished run of another config ({diff}); "
                          "skip_finished and resume=auto only skip the same run — delete it or choose another directory")
    print(f"skip: {run.path} already finished", flush=True)
    return {**read_summary(run.path), "skipped": True}


def auto_resume(cfg: DictConfig) -> bool:
    """``resume=auto`` or ``skip_finished=true``: a run dir holding this run continues it in place."""
    return cfg.resume == "auto" or bool(cfg.get("skip_finished"))


def fit(cfg: DictConfig) -> dict:
    """Train as ``cfg`` says; write the run directory; return ``summary.json``'s content.

    The run dir is locked while this runs (:meth:`RunDir.lock`): a second ``fit`` into it is
    refused — with ``skip_finished`` (sweeps), skipped as in progress elsewhere. With
    ``resume=auto`` (and in sweeps with ``skip_finished``) a run dir already holding this run is
    skipped when finished, continued in place from its newest good checkpoint when not.
    ``resume=RUN_DIR`` continues that run dir's newest good checkpoint (in place when it is
    ``hydra.run.dir``, as ``resume=auto``; else into ``hydra.run.dir``, as ``resume=CHECKPOINT``)."""
    cfg = _resolve_resume(cfg)
    validate_fit(cfg)
    device = resolve_device(cfg.device)
    run = RunDir(cfg.run_dir)
    # refusals and skips that need no lock come first: they write nothing (not even the lock file)
    if run.existing_run():
        if not auto_resume(cfg):
            _refuse_existing(run)
        finished = _finished_run(cfg, run)
        if finished is not None:
            return finished
    run.probe(min_free_mb=cfg.checkpoint.get("min_free_mb", 0))
    prior = _wandb_run()
    try:
        with run.lock():
            return _fit(cfg, run, device)
    except RunDirBusy as e:
        if not cfg.get("skip_finished"):
            raise
        print(f"skip: {run.path} is being trained by another fit ({e})", flush=True)
        return {"skipped": True, "busy": True, "run_dir": str(run.path)}
    finally:
        # Lightning's WandbLogger leaves its run open, and the next WandbLogger in this process (the
        # next run of a multirun, a test) would log into it: close the run this fit started
        current = _wandb_run()
        if current is not None and current is not prior:
            sys.modules["wandb"].finish()


def _resolve_resume(cfg: DictConfig) -> DictConfig:
    """``resume=DIR`` (a run dir or its checkpoints/ folder) as ``auto`` (DIR is this run's dir) or as
    the path of DIR's newest good checkpoint; any other value unchanged."""
    if cfg.get("resume") in (None, "auto") or not Path(str(cfg.resume)).expanduser().is_dir():
        return cfg
    given = Path(str(cfg.resume)).expanduser()
    run_dir = given.parent if given.name == "checkpoints" and not (given / "checkpoints").is_dir() else given
    cfg = cfg.copy()
    if cfg.get("run_dir") is not None and run_dir.resolve() == Path(str(cfg.run_dir)).resolve():
        cfg.resume = "auto"
    else:
        cfg.resume = resume_checkpoint(given)
        print(f"resume={given}: continuing from {cfg.resume}", flush=True)
    return cfg


def _wandb_run():
    return getattr(sys.modules.get("wandb"), "run", None)


def _refuse_existing(run: RunDir) -> None:
    raise ConfigError(f"hydra.run.dir={run.path} already holds a run ({', '.join(run.existing_run())}); "
                      "choose a new directory, or continue it there with resume=auto "
                      "(resume=PATH writes its continuation to a new one)")


def _resume_in_place(cfg: DictConfig, run: RunDir) -> str | None:
    """The checkpoint an unfinished run in ``run`` continues from (its metrics log cut back to it),
    or None after moving a run that has no good checkpoint aside (nothing written is lost)."""
    diff = run_config_diff(run.path, OmegaConf.to_container(cfg, resolve=True))
    if diff:
        raise ConfigError(f"hydra.run.dir={run.path} holds an unfinished run of another config ({diff}); "
                          "resume=auto continues only the same run — delete it or choose another directory")
    found, bad = newest_checkpoint(run.checkpoints)
    for path, why in bad:
        print(f"resume=auto: skipping {path} ({why})", flush=True)
    if found is None:
        moved = run.move_aside()
        print(f"{run.path} held an unfinished run without a good checkpoint; moved it to {moved} and "
              "starting again", flush=True)
        return None
    path, step = found
    dropped = run.truncate_metrics(after_step=step)
    print(f"resume=auto: continuing {run.path} from {path} (update {step}; "
          f"{dropped} metrics rows after it dropped)", flush=True)
    return str(path)


def _fit(cfg: DictConfig, run: RunDir, device: torch.device) -> dict:
    resume = None if cfg.resume in (None, "auto") else str(cfg.resume)
    in_place = False
    if run.existing_run():
        if not auto_resume(cfg):
            _refuse_existing(run)
        finished = _finished_run(cfg, run)   # again, under the lock: it may have finished meanwhile
        if finished is not None:
            return finished
        resume = _resume_in_place(cfg, run)
        in_place = resume is not None
    # SIGTERM/SIGINT/SIGUSR1/SIGUSR2 from here on: finish the rollout, checkpoint, stop (a signal
    # while the env and models are built stops the run after its first rollout)
    preemption = Preemption()
    preemption.arm()
    try:
        return _train(cfg, run, device, resume, in_place, preemption)
    finally:
        preemption.disarm()


def _train(cfg: DictConfig, run: RunDir, device: torch.device, resume: str | None, in_place: bool,
           preemption: Preemption) -> dict:
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
        updates_per_rollout=dm.updates_per_rollout, sa_method=algo.sa.method,
        beta_start=algo.sa.beta_start, beta_end=algo.sa.beta_end, beta_ramp=algo.sa.beta_ramp,
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)

    # Create loggers and callbacks (named _target_ mappings; null entries are dropped)
    loggers = [MetricsLogger(run.path)]
    loggers += [hydra.utils.instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    if in_place:   # the loggers' files continue from the checkpoint (Lightning's CSVLogger would delete its file)
        continue_logs(loggers, torch.load(resume, map_location="cpu", weights_only=False)["global_step"])
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    final = FinalCheckpoint(run.checkpoints / "last.ckpt")   # first: before the end-of-run evaluation
    callbacks.insert(0, final)
    callbacks.append(preemption)
    callbacks.append(DivergenceGuard())  # no checkpoint holds a NaN (checkpoint callbacks run after it)
    if cfg.checkpoint.get("every_minutes") is not None:
        callbacks.append(TimedCheckpoint(cfg.checkpoint.every_minutes, run.checkpoints / "last.ckpt"))
    callbacks.append(ModelCheckpoint(
        dirpath=run.checkpoints, filename="rollout{epoch:05d}-t{step}",
        every_n_epochs=cfg.checkpoint.every_n_rollouts or 0,  # null: no periodic ones, only last.ckpt
        save_on_train_epoch_end=True, save_top_k=-1, save_last=True, auto_insert_metric_name=False,
        enable_version_counter=False,   # last.ckpt is rewritten in place, never last-v1.ckpt beside it
    ))
    plugins = [AtomicCheckpointIO()]   # every checkpoint written whole or not at all
    if SLURMEnvironment.detect():   # preemption is ours (Preemption, requeue_on_slurm), not Lightning's auto-requeue
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, accelerator="gpu" if device.type == "cuda" else "cpu", max_epochs=n_rollouts,
        logger=loggers, callbacks=callbacks, default_root_dir=str(run.path),
        plugins=plugins, enable_progress_bar=any(type(c).__name__.endswith("ProgressBar") for c in callbacks),
    )
    run.write_config(cfg)   # only now: a logger, callback or trainer setting that fails has written nothing

    # Train
    t0 = time.perf_counter()
    frames0 = 0
    if resume is not None:
        frames0 = torch.load(resume, map_location="cpu", weights_only=False)["prunerl"]["frames"]
    # weights_only=False: our checkpoints hold numpy RNG states and env physics (our own files)
    diverged: Diverged | None = None
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=False)
    except Diverged as e:   # the weights may hold the NaN now: no checkpoint, no figures from them
        diverged = e
    interrupted = preemption.interrupted
    if diverged is None and interrupted is None:
        for c in trainer.callbacks:   # resumed from its final checkpoint: Lightning ran no on_train_end
            if hasattr(c, "finish"):
                c.finish(trainer, module)
    interrupted = interrupted or next((c.interrupted for c in trainer.callbacks
                                       if c is not preemption and getattr(c, "interrupted", None)), None)
    wall = time.perf_counter() - t0
    if diverged is None and not final.saved:
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
        "resumed_from": resume,
        "status": "finished",
    }
    if diverged is not None:
        good, _ = newest_checkpoint(run.checkpoints)
        summary.update(status="diverged", diverged_at_update=diverged.update, diverged_term=diverged.term,
                       error=str(diverged), last_good_checkpoint=str(good[0]) if good else resume)
        run.write_summary(summary)
        return summary
    for extra in trainer.callbacks:  # callbacks may add their figures (pruning, Lipschitz, eval)
        if hasattr(extra, "summary"):
            summary.update(extra.summary(trainer, module))
    complete = trainer.global_step >= module.total_updates and all(
        c.done(trainer) for c in trainer.callbacks if hasattr(c, "done"))
    if interrupted is not None and complete:
        # the signal came during the end-of-run evaluation, which finished: nothing is left to do
        summary["signal_received"] = interrupted
    elif interrupted is not None:
        # not a finished run: no evaluation figures (an earlier periodic one is in metrics.jsonl)
        summary.update(status="interrupted", interrupted_by=interrupted, clean_return=None,
                       attack_returns={}, resume=str(run.checkpoints / "last.ckpt"))
        for k in ("robust_return", "robust_return_avg", "evaluation", "evaluation_stochastic"):
            summary.pop(k, None)
    run.write_summary(summary)
    return summary
