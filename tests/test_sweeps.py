"""Sweep presets, launchers and W&B sweep definitions compose into valid `fit` configs."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from prunerl.config import validate_fit
from tests.conftest import CONF_DIR


def compose_with_hydra(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["run_dir=/tmp/unused", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("preset, swept", [
    ("baseline", {"algo.kappa", "seed"}),
    ("methods", {"pruning", "pruning.final_sparsity", "algo.kappa", "seed"}),
    ("interval", {"pruning.interval", "pruning.final_sparsity", "seed"}),
])
def test_sweep_presets_compose_and_every_grid_point_validates(preset, swept):
    cfg = compose_with_hydra(f"sweep={preset}")
    params = dict(cfg.hydra.sweeper.params)
    assert set(params) == swept
    sweep_dir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert sweep_dir["subdir"] == "${hydra.job.override_dirname}"  # unique run dirs across presets
    # every value of every axis gives a valid fit config (one axis at a time, the others at
    # their first value: the full product would only repeat the same checks)
    axes = {k: str(vals).split(",") for k, vals in params.items()}
    first = {k: v[0] for k, v in axes.items()}
    for key, values in axes.items():
        for v in values:
            point = {**first, key: v}
            validate_fit(compose_with_hydra(f"sweep={preset}", *(f"{k}={x}" for k, x in point.items())))


@pytest.mark.parametrize("launcher, target", [
    ("local", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launchers_compose(launcher, target):
    cfg = compose_with_hydra("sweep=methods", f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher._target_ == target
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.array_parallelism == 64


@pytest.mark.parametrize("path", sorted((Path(CONF_DIR) / "wandb_sweep").glob("*.yaml")))
def test_wandb_sweeps_call_fit_with_hydra_overrides_that_compose(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "prunerl"
    assert sweep["command"] == ["${env}", "${interpreter}", "-m", "${program}", "fit", "${args_no_hyphens}"]
    params = sweep["parameters"]
    for key, spec in params.items():
        for value in spec.get("values", [spec.get("value")]):
            overrides = [f"{key}={value}"]
            if key != "pruning" and "pruning" in params and key.startswith("pruning."):
                overrides.insert(0, "pruning=magnitude")  # a pruning.* key needs a pruning group
            validate_fit(compose_with_hydra(*overrides))
