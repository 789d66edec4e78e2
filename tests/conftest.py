"""Shared helpers: compose the real Hydra config (as the CLI does) and shrink it for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

# Property tests draw the same examples on every run (CI must not pass or fail by chance);
# HYPOTHESIS_PROFILE=explore draws fresh examples on each run (run it a few times to hunt).
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


@pytest.fixture(scope="session")
def neuron_run(tmp_path_factory):
    """A short real fit, shared by the neuron-pruning and export tests: 4 rollouts of 1,024 frames,
    64-wide nets, pruning=neuron to 70% of the weights. (run dir, summary)"""
    from prunerl.fit import fit

    run = tmp_path_factory.mktemp("neuron") / "run"
    summary = fit(compose_cfg(run, *SMALL, "total_frames=4096", "pruning=neuron", "pruning.final_sparsity=0.7",
                              "algo.kappa=0", "++callbacks.evaluation=null"))
    return run, summary


@pytest.fixture
def small_cfg(tmp_path):
    def make(*overrides, run_dir=None):
        return compose_cfg(run_dir or tmp_path / "run", *SMALL, *overrides)

    return make


# -- the pruning callback's hooks driven by hand (tests/test_pruning*.py) ------------------------
class TinyModule(torch.nn.Module):
    """A stand-in for PPOModule: actor.mean_net and critic.value_net, total_updates."""

    def __init__(self, total_updates=100):
        super().__init__()
        from prunerl.models import Critic, GaussianActor

        torch.manual_seed(0)
        self.actor = GaussianActor(4, 2, (16, 16))
        self.critic = Critic(4, (16, 16))
        self.total_updates = total_updates


class FakeTrainer:
    """What the pruning callback reads of a Trainer: the update counter, its optimisers."""

    def __init__(self):
        self.global_step = 0
        self.optimizers: list = []
        self.datamodule = None


def callback_steps(module, cb, trainer, n, lr=1e-2):
    """n Adam updates calling the callback's hooks as Lightning does (one optimiser kept on the
    trainer, so the callback can zero its moments)."""
    if not trainer.optimizers:
        trainer.optimizers = [torch.optim.Adam(list(module.parameters()), lr=lr)]
    opt = trainer.optimizers[0]
    for group in opt.param_groups:
        group["lr"] = lr
    x = torch.randn(64, 4)
    for _ in range(n):
        opt.zero_grad()
        (module.actor(x).pow(2).sum() - module.critic(x).sum()).backward()
        cb.on_after_backward(trainer, module)
        cb.on_before_optimizer_step(trainer, module, opt)
        opt.step()
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None, None, 0)
