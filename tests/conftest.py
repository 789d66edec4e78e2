"""Shared helpers: compose the real Hydra config (as the CLI does) and shrink it for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

# A small real run: a MuJoCo task, 2 rollouts of 1,024 frames, 64-wide nets.
SMALL = [
    "env=inverted_pendulum", "env.num_envs=8", "total_frames=2048", "algo.frames_per_batch=1024",
    "algo.minibatches=8", "algo.epochs=2", "algo.model.hidden=[64,64]", "logger=none",
    "callbacks.progress=null",
]


def compose_cfg(run_dir, *overrides, config_name: str = "config"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        extra = [f"run_dir={run_dir}"] if config_name == "config" else []
        return compose(config_name=config_name, overrides=[*extra, *overrides])


@pytest.fixture
def small_cfg(tmp_path):
    def make(*overrides, run_dir=None):
        return compose_cfg(run_dir or tmp_path / "run", *SMALL, *overrides)

    return make
