"""Reading a PruneRL checkpoint: the one home of checkpoint loading (DESIGN.md, Layering).

``fit`` (a learned adversary's victim), ``evaluate`` (the policy to attack, a trained adversary)
and config validation (``resume=``, ``victim=``) all read checkpoints through these functions;
they sit below all three, so none of them imports another to load one.

A checkpoint written by ``fit`` carries its resolved config (``ckpt["prunerl"]["config"]``), the
weights (``state_dict``: ``actor.*``, ``critic.*``) and the datamodule's state, which holds the
observation normaliser's statistics. Network sizes are read from the weights themselves (a learned
adversary's actor outputs an observation-sized perturbation, not an action).
"""

from __future__ import annotations

from pathlib import Path

import torch

from prunerl.envs import RunningNormalizer
from prunerl.errors import ConfigError
from prunerl.models import Critic, GaussianActor


def load_checkpoint(path, key: str = "checkpoint") -> dict:
    """Load a PruneRL checkpoint, or raise :class:`ConfigError` saying what is wrong with it.

    ``key`` names the setting the path came from (``checkpoint``, ``resume``, ``victim``)."""
    p = Path(str(path)).expanduser()
    expected = "expected a .ckpt written by `python -m prunerl fit`"
    if not p.is_file():
        raise ConfigError(f"{key}={path} does not exist; {expected}" if not p.exists()
                          else f"{key}={path} is not a file; {expected}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 — any unpickling failure means the file is unusable
        why = (str(e).strip().splitlines() or [""])[0]  # the error stays one line
        raise ConfigError(f"{key}={path} is not a readable checkpoint ({type(e).__name__}: {why}); "
                          f"{expected}") from None
    if not isinstance(ckpt, dict) or "prunerl" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"{key}={path} is not a PruneRL checkpoint (no 'prunerl' entry); "
                          "expected a .ckpt written by `python -m prunerl fit`")
    return ckpt


def linear_shapes(state: dict, prefix: str) -> list[torch.Size]:
    """Weight shapes of the Linear layers under ``prefix`` in a state dict, in order."""
    return [v.shape for k, v in state.items() if k.startswith(prefix) and k.endswith(".weight")]


def _sub_state(ckpt: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def normalizer_state(ckpt: dict) -> dict:
    """The observation normaliser's statistics (:class:`~prunerl.envs.RunningNormalizer` state)."""
    return ckpt[ckpt["prunerl"]["datamodule_key"]]["normalizer"]


def frozen_normalizer(state: dict, clip: float = 10.0) -> RunningNormalizer:
    """A :class:`RunningNormalizer` with ``state``'s statistics, frozen (evaluation never moves them);
    ``clip``: the run's ``env.clip_obs``."""
    norm = RunningNormalizer(state["obs_mean"].shape[-1], 1, clip=clip)
    return norm.load_statistics(state).freeze()


def actor_from_checkpoint(ckpt: dict) -> tuple[GaussianActor, dict, dict]:
    """(actor with the checkpoint's weights, normaliser state, run config) from a loaded checkpoint."""
    cfg = ckpt["prunerl"]["config"]
    m = cfg["algo"]["model"]
    state = _sub_state(ckpt, "actor.")
    shapes = linear_shapes(state, "mean_net.")
    actor = GaussianActor(shapes[0][1], shapes[-1][0], tuple(m["hidden"]), m["activation"], m["sigma"],
                          m["learn_std"])
    actor.load_state_dict(state)
    return actor, normalizer_state(ckpt), cfg


def critic_from_checkpoint(ckpt: dict) -> Critic:
    """The checkpoint's critic V(s) (state_dict keys ``critic.*``), for the value-guided attack."""
    m = ckpt["prunerl"]["config"]["algo"]["model"]
    state = _sub_state(ckpt, "critic.")
    critic = Critic(linear_shapes(state, "value_net.")[0][1], tuple(m["hidden"]), m["activation"])
    critic.load_state_dict(state)
    return critic
