"""Sweep presets, launchers and W&B sweep definitions compose into valid `fit` configs."""

import json
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


def _grid(axes: dict[str, list]) -> list[dict]:
    points = [{}]
    for key, values in axes.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def _fingerprint(*overrides) -> str:
    from prunerl.runset import fingerprint

    cfg = compose_with_hydra(*overrides)
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra")
    return fingerprint(OmegaConf.to_container(OmegaConf.create(container), resolve=True))


def _no_run_twice(points: list[tuple[str, list[str]]]) -> None:
    seen: dict[str, str] = {}
    twice = []
    for name, overrides in points:
        fp = _fingerprint(*overrides)
        if fp in seen:
            twice.append(f"{name} = {seen[fp]}")
        seen.setdefault(fp, name)
    assert not twice, f"the same run twice: {twice}"


def test_hydra_sweep_presets_together_hold_no_run_twice():
    """sweep=baseline, methods and interval share one folder: no grid point may be another's run
    (the report would count it once, but it would cost a run). Seed 0 stands for every seed."""
    points = []
    for preset in ("baseline", "methods", "interval"):
        params = dict(compose_with_hydra(f"sweep={preset}").hydra.sweeper.params)
        assert "0" in str(params.pop("seed")).split(",")
        for point in _grid({k: str(v).split(",") for k, v in params.items()}):
            overrides = [f"{k}={v}" for k, v in point.items()]
            points.append((f"sweep={preset} {' '.join(overrides)}", [f"sweep={preset}", "seed=0", *overrides]))
    _no_run_twice(points)


def test_wandb_sweeps_together_hold_no_run_twice():
    points = []
    for path in sorted((Path(CONF_DIR) / "wandb_sweep").glob("*.yaml")):
        params = yaml.safe_load(path.read_text())["parameters"]
        params.pop("logger", None)
        assert 0 in params.pop("seed")["values"]
        axes = {k: spec.get("values", [spec.get("value")]) for k, spec in params.items()}
        for point in _grid(axes):
            overrides = [f"{k}={v}" for k, v in point.items()]
            if "pruning" in point:  # the group first, as `fit key=value ...` composes it
                overrides.sort(key=lambda o: not o.startswith("pruning="))
            points.append((f"{path.name}: {' '.join(overrides)}", ["seed=0", *overrides]))
    _no_run_twice(points)


def test_a_run_is_the_same_run_whatever_sa_keys_its_method_does_not_read():
    """The SA keys a run does not read do not make it another run: the convex β schedule for sgld,
    sgld's steps for convex; a run saved before algo.sa.method existed is sgld. (At κ = 0 they are
    kept, so that the report's settings put κ = 0 and κ > 0 runs of one config together.)"""
    fp = _fingerprint
    assert fp("algo.kappa=0.3", "algo.sa.steps=5") != fp("algo.kappa=0.3", "algo.sa.steps=10")
    assert fp("algo.kappa=0.3", "algo.sa.beta_start=0.5") == fp("algo.kappa=0.3")
    assert fp("algo.kappa=0.3", "algo.sa.method=convex") != fp("algo.kappa=0.3")
    assert (fp("algo.kappa=0.3", "algo.sa.method=convex", "algo.sa.steps=10")
            == fp("algo.kappa=0.3", "algo.sa.method=convex"))
    assert (fp("algo.kappa=0.3", "algo.sa.method=convex", "algo.sa.beta_end=0.5")
            != fp("algo.kappa=0.3", "algo.sa.method=convex"))
    assert fp("algo.kappa=0.3", "algo.sa.eps_ramp=0.5") != fp("algo.kappa=0.3")   # read by both methods

    from prunerl.runset import fingerprint
    cfg = compose_with_hydra("algo.kappa=0.3")
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra")
    today = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    old = json.loads(json.dumps(today))
    for k in ("method", "beta_start", "beta_end", "beta_ramp"):   # as a config.yaml saved before them
        del old["algo"]["sa"][k]
    assert fingerprint(old) == fingerprint(today)
