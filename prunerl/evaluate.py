"""``python -m prunerl evaluate checkpoint=PATH``: clean evaluation of a checkpoint.

Rebuilds the actor and the frozen normaliser from the checkpoint alone (its config travels in it),
runs N episodes, prints a line and writes ``<checkpoint stem>.eval.json`` beside the checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from prunerl.config import ConfigError, load_checkpoint, resolve_device
from prunerl.evaluation import run_episodes
from prunerl.models import GaussianActor


def actor_from_checkpoint(ckpt: dict) -> tuple[GaussianActor, dict, dict]:
    """(actor with the checkpoint's weights, normaliser state, run config) from a loaded checkpoint."""
    cfg = ckpt["prunerl"]["config"]
    m = cfg["algo"]["model"]
    from prunerl.envs import TASKS
    import gymnasium as gym

    probe = gym.make(TASKS[cfg["env"]["name"]].env_id)
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    probe.close()
    actor = GaussianActor(obs_dim, act_dim, tuple(m["hidden"]), m["activation"], m["sigma"], m["learn_std"])
    actor_state = {k[len("actor."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("actor.")}
    actor.load_state_dict(actor_state)
    dm_state = ckpt[ckpt["prunerl"]["datamodule_key"]]
    return actor, dm_state["normalizer"], cfg


def evaluate(cfg: DictConfig) -> dict:
    if cfg.checkpoint is None:
        raise ConfigError("checkpoint=PATH is required (e.g. checkpoint=outputs/.../checkpoints/last.ckpt)")
    if not isinstance(cfg.episodes, int) or cfg.episodes <= 0:
        raise ConfigError(f"episodes={cfg.episodes!r} must be a positive integer")
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint)
    actor, norm_state, run_cfg = actor_from_checkpoint(ckpt)
    actor.to(device).eval()
    task = run_cfg["env"]["name"]
    t0 = time.perf_counter()
    result = run_episodes(actor, norm_state, task, cfg.episodes, deterministic=cfg.deterministic,
                          seed=cfg.seed, num_envs=cfg.num_envs, device=device)
    out = {
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "env": task,
        "frames_trained": ckpt["prunerl"]["frames"],
        "seed": cfg.seed,
        "clean": result,
        "wall_time_s": time.perf_counter() - t0,
    }
    path = Path(cfg.checkpoint).with_suffix(".eval.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    mode = "deterministic" if cfg.deterministic else "stochastic"
    print(f"{task}  clean return {result['mean_return']:.1f} ± {result['std_return']:.1f} over "
          f"{result['episodes']} episodes ({mode})  ->  {path}")
    return out
