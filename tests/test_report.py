"""The report: exact sweet spots, normalisations, CIs and seed counts on run directories written
the way `fit` writes them (the real config, RunDir's config.yaml and summary.json) with known
numbers; duplicates counted once, adversaries skipped, settings kept apart, bad input refused."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from prunerl.config import ConfigError
from prunerl.report import report
from prunerl.rundir import RunDir
from prunerl.sweetspot import _t_quantile, ci, expanded_tail
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_cfg():
    return OmegaConf.to_container(compose_cfg("/unused", "pruning=magnitude"), resolve=False)


@pytest.fixture
def write_run(base_cfg):
    """A run directory as `fit` leaves it: the resolved config and a summary.json with these figures."""

    def write(root, name, *, method="magnitude", sparsity=0.5, seed=0, kappa=0.3, clean, attacks, interval=15,
              eps=None, frames=None, deterministic=True, episodes=10, lipschitz=None, bound=None,
              stochastic=None, victim=None, env="hopper", device="cpu", ball="linf", certificates=None):
        d = Path(root) / name
        cfg = OmegaConf.create(base_cfg)
        cfg.seed, cfg.algo.kappa, cfg.device = seed, kappa, device
        cfg.pruning.criterion, cfg.pruning.final_sparsity, cfg.pruning.interval = method, sparsity, interval
        cfg.run_dir = str(d)
        if env != "hopper":
            cfg.env.name, cfg.env.id = env, {"walker2d": "Walker2d-v5"}[env]
        if eps is not None:
            cfg.env.eps = eps
        if frames is not None:
            cfg.total_frames = frames
        cfg.evaluation.deterministic, cfg.evaluation.episodes = deterministic, episodes
        if victim is not None:
            cfg.victim = victim
        run = RunDir(d)
        run.write_config(cfg)
        summary = {
            "frames": cfg.total_frames, "wall_time_s": 1.0, "sps": 1.0, "train_return": clean,
            "clean_return": clean, "attack_returns": attacks,
            "sparsity": {"global": sparsity, "actor": sparsity, "critic": sparsity},
            "lipschitz_surrogate": lipschitz, "certified_bound": bound, "seed": seed, "env": cfg.env.name,
            "env_id": cfg.env.id, "eps": cfg.env.eps, "kappa": kappa,
            "pruning_method": method, "final_sparsity": 0.0 if method == "none" else sparsity,
            "evaluation": {"eps": cfg.env.eps, "episodes": episodes, "deterministic": deterministic,
                           "frames": cfg.total_frames},
        }
        if ball is not None:  # older summaries have no certified_bound_ball
            summary["certified_bound_ball"] = ball
        if certificates is not None:  # (ibp median, crown median, global) of ‖Δμ‖₂; c = 2
            ibp, crown, glob = certificates
            summary["certificates"] = {
                "ball": "linf", "eps": cfg.env.eps, "c": 2.0, "threshold": 0.1, "states": 128,
                "global": {"dmu": glob, "tv": 2 * glob},
                "ibp": {"dmu": {"median": ibp}, "tv": {"median": 2 * ibp}},
                "crown": {"dmu": {"median": crown}, "tv": {"median": 2 * crown}}}
        if stochastic is not None:
            summary["evaluation_stochastic"] = {"clean_return": stochastic[0], "attack_returns": stochastic[1]}
        run.write_summary(summary)
        return d

    return write


def cell(root, write_run, prefix, *, cleans, mads, randoms, **kw):
    """One cell: a run per seed 0, 1, 2, ... with these per-seed figures."""
    for seed, (c, m, r) in enumerate(zip(cleans, mads, randoms)):
        write_run(root, f"{prefix}_s{seed}", seed=seed, clean=c, attacks={"mad": m, "random": r}, **kw)


def hand_made(root, write_run, **kw):
    """κ = 0.3; dense: clean 100, mad 50, random 80 (seed means); magnitude at 30% and 70%."""
    cell(root, write_run, "dense", method="none", sparsity=0.0, cleans=[90, 100, 110], mads=[40, 50, 60],
         randoms=[70, 80, 90], **kw)
    # 30%: clean 1.0, mad 1.5, random 85/80 -> robust (avg) 1.28125, score 1.140625; worst/seed = mad -> 75/50
    cell(root, write_run, "m30", sparsity=0.3, cleans=[95, 100, 105], mads=[70, 75, 80], randoms=[85, 85, 85], **kw)
    # 70%: clean 0.6, mad 2.0, random 0.95 -> robust (avg) 1.475, score 1.0375; worst/seed = 76 -> 1.52
    cell(root, write_run, "m70", sparsity=0.7, cleans=[60, 60, 60], mads=[100, 100, 100], randoms=[76, 76, 76], **kw)


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# -- Table 2 and 3: exact figures and CI bounds -------------------------------------------------
def test_table2_exact_sweet_spot_normalised_values_ci_bounds_and_seed_counts(tmp_path, write_run):
    runs = tmp_path / "runs"
    hand_made(runs, write_run)
    result = report(runs, tmp_path / "out")
    assert result["runs"] == 9
    (row,) = result["table2"]
    assert (row["env"], row["kappa"], row["method"], row["interval"]) == ("hopper", 0.3, "magnitude", "15")
    assert row["sweet_spot"] == 0.3 and row["seeds"] == 3 and row["baseline_seeds"] == 3
    assert row["baseline"] == "pruning=none, κ=0.3 (3 seeds)" and row["zero_point"] == "pruning=none"
    assert row["clean"] == pytest.approx(1.0)
    assert row["robust_worst"] == pytest.approx(1.5)
    assert row["norm_robust_avg"] == pytest.approx((1.5 + 85 / 80) / 2)
    assert row["score"] == pytest.approx((1.0 + (1.5 + 85 / 80) / 2) / 2)
    assert row["clean_return"] == pytest.approx(100) and row["worst_return"] == pytest.approx(75)
    # 3 seeds: the expanded interval's tails (~1e-7) are the extreme resamples — every seed the same,
    # the cell's and the baseline's resampled independently: [min cell / max baseline, max / min]
    approx = lambda x: pytest.approx(x, rel=1e-3)  # noqa: E731
    assert (row["clean_lo"], row["clean_hi"]) == (approx(95 / 110), approx(105 / 90))
    assert (row["robust_worst_lo"], row["robust_worst_hi"]) == (approx(70 / 60), approx(80 / 40))
    assert (row["norm_robust_avg_lo"], row["norm_robust_avg_hi"]) == (
        approx((70 / 60 + 85 / 90) / 2), approx((80 / 40 + 85 / 70) / 2))
    assert (row["score_lo"], row["score_hi"]) == (approx((95 / 110 + (70 / 60 + 85 / 90) / 2) / 2),
                                                  approx((105 / 90 + (80 / 40 + 85 / 70) / 2) / 2))
    assert (row["clean_return_lo"], row["clean_return_hi"]) == (approx(95), approx(105))
    assert (row["worst_return_lo"], row["worst_return_hi"]) == (approx(70), approx(80))
    assert 0 < row["sweet_spot_share"] < 1
    # the dense point is normalised to itself in every resample: exactly 1 with a zero-width CI
    agg = {(r["method"], r["sparsity"]): r for r in rows(tmp_path / "out" / "aggregated.csv")}
    dense = agg[("none", "0.0")]
    assert [float(dense[k]) for k in ("norm_clean", "norm_clean_lo", "norm_clean_hi")] == [1.0, 1.0, 1.0]
    assert dense["seeds"] == "3" and dense["seed_list"] == "0 1 2"
    m70 = agg[("magnitude", "0.7")]
    assert float(m70["robust_worst"]) == pytest.approx(76 / 50) and float(m70["score"]) == pytest.approx(1.0375)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert ("| hopper | 0.3 | magnitude | 15 | 30% | 1.00 [0.86, 1.17] | 1.50 [1.17, 2.00] | 1.28 [1.06, 1.61] | "
            "100 [95, 105] | 75 [70, 80] | 3 |") in md


def test_table3_worst_seed_at_each_attacks_sweet_spot(tmp_path, write_run):
    runs = tmp_path / "runs"
    hand_made(runs, write_run)
    (row,) = report(runs, tmp_path / "out")["table3"]
    # mad peaks at 70% (100), random at 30% (85): a 1–1 tie, the mode favours the smaller
    assert row["attack_sweet_spots"] == "mad 70%, random 30%" and row["pruning"] == 0.3
    assert row["worst_seed_abs"] == pytest.approx((100 + 85) / 2)
    assert row["worst_seed_norm"] == pytest.approx((100 / 50 + 85 / 80) / 2)
    assert row["worst_seed_norm_lo"] <= row["worst_seed_norm"] <= row["worst_seed_norm_hi"]
    assert row["seeds"] == 3 and row["baseline"] == "pruning=none, κ=0.3 (3 seeds)"


def test_worst_seed_is_the_lowest_seed_not_the_mean(tmp_path, write_run):
    runs = tmp_path / "runs"
    cell(runs, write_run, "dense", method="none", sparsity=0.0, cleans=[100] * 3, mads=[50] * 3, randoms=[80] * 3)
    cell(runs, write_run, "m50", sparsity=0.5, cleans=[100] * 3, mads=[40, 60, 80], randoms=[80, 90, 100])
    (row,) = report(runs, tmp_path / "out")["table3"]
    assert row["pruning"] == 0.5
    assert row["worst_seed_abs"] == pytest.approx((40 + 80) / 2)
    assert row["worst_seed_norm"] == pytest.approx((40 / 50 + 80 / 80) / 2)


def test_robust_worst_is_each_seeds_worst_attack_and_ties_pick_the_smaller_sparsity(tmp_path, write_run):
    runs = tmp_path / "runs"
    cell(runs, write_run, "dense", method="none", sparsity=0.0, cleans=[100] * 3, mads=[50] * 3, randoms=[50] * 3)
    # each seed has another worst attack: per seed 40, 40, 80 (mean 53.3); per attack the means are 70 each
    cell(runs, write_run, "m30", sparsity=0.3, cleans=[100] * 3, mads=[40, 90, 80], randoms=[90, 40, 80])
    # exactly the same score as 30% (clean 1, robust (avg) 70/50), from other figures
    cell(runs, write_run, "m50", sparsity=0.5, cleans=[100] * 3, mads=[70] * 3, randoms=[70] * 3)
    (row,) = report(runs, tmp_path / "out")["table2"]
    assert row["sweet_spot"] == 0.3  # a tie: the smaller sparsity
    assert row["robust_worst"] == pytest.approx((40 + 40 + 80) / 3 / 50)
    assert row["worst_return"] == pytest.approx((40 + 40 + 80) / 3)
    assert row["norm_robust_avg"] == pytest.approx(70 / 50)


# -- normalisation: the paper's (every κ to the unpruned SA-trained run) and the alternative --
def with_kappa0(root, write_run):
    hand_made(root, write_run)
    cell(root, write_run, "k0_dense", method="none", sparsity=0.0, kappa=0.0, cleans=[60] * 3, mads=[20] * 3,
         randoms=[40] * 3)
    cell(root, write_run, "k0_m30", sparsity=0.3, kappa=0.0, cleans=[66] * 3, mads=[30] * 3, randoms=[40] * 3)


def test_kappa0_is_normalised_to_the_sa_trained_dense_run_by_default(tmp_path, write_run):
    runs = tmp_path / "runs"
    with_kappa0(runs, write_run)
    t2 = {r["kappa"]: r for r in report(runs, tmp_path / "out")["table2"]}
    k0 = t2[0.0]
    assert k0["baseline"] == "pruning=none, κ=0.3 (3 seeds)"
    assert k0["sweet_spot"] == 0.3
    assert k0["clean"] == pytest.approx(66 / 100)
    assert k0["robust_worst"] == pytest.approx(30 / 50)
    assert k0["norm_robust_avg"] == pytest.approx((30 / 50 + 40 / 80) / 2)
    # the κ = 0 cells are constant, so the CI is the SA baseline's spread alone
    assert (k0["clean_lo"], k0["clean_hi"]) == (pytest.approx(66 / 110, rel=1e-3), pytest.approx(66 / 90, rel=1e-3))
    assert t2[0.3]["clean"] == pytest.approx(1.0)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "normalised to the unpruned SA-trained run, κ=0.3" in md
    for name in ("fig2_frontier_hopper.png", "fig3_attacks_hopper.png", "fig4_sa_hopper.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name


def test_same_kappa_normalises_each_kappa_to_its_own_dense_run(tmp_path, write_run):
    runs = tmp_path / "runs"
    with_kappa0(runs, write_run)
    k0 = {r["kappa"]: r for r in report(runs, tmp_path / "out", normalize="same_kappa")["table2"]}[0.0]
    assert k0["baseline"] == "pruning=none, κ=0 (3 seeds)"
    assert k0["clean"] == pytest.approx(1.1) and k0["robust_worst"] == pytest.approx(1.5)
    assert k0["norm_robust_avg"] == pytest.approx((1.5 + 1.0) / 2)
    assert (k0["clean_lo"], k0["clean_hi"]) == (1.1, 1.1)  # both cells constant


def test_baseline_kappa_defaults_to_the_smallest_positive_kappa_and_can_be_chosen(tmp_path, write_run):
    runs = tmp_path / "runs"
    with_kappa0(runs, write_run)
    cell(runs, write_run, "k5_dense", method="none", sparsity=0.0, kappa=0.5, cleans=[200] * 3, mads=[100] * 3,
         randoms=[100] * 3)
    by_default = {r["kappa"]: r for r in report(runs, tmp_path / "a")["table2"]}
    assert by_default[0.0]["clean"] == pytest.approx(66 / 100)
    chosen = {r["kappa"]: r for r in report(runs, tmp_path / "b", baseline_kappa=0.5)["table2"]}
    assert chosen[0.0]["clean"] == pytest.approx(66 / 200) and chosen[0.3]["clean"] == pytest.approx(100 / 200)
    assert chosen[0.0]["baseline"] == "pruning=none, κ=0.5 (3 seeds)"
    assert "baseline_kappa=0.5" in (tmp_path / "b" / "summary.md").read_text()


# -- which 0% run is the baseline --------------------------------------------------------------
def test_dense_run_is_the_baseline_even_beside_a_methods_own_zero(tmp_path, write_run):
    runs = tmp_path / "runs"
    hand_made(runs, write_run)
    # magnitude at 0% with half the returns; sorting after "dense", it must still not be the baseline
    cell(runs, write_run, "zz_m0", sparsity=0.0, cleans=[50] * 3, mads=[25] * 3, randoms=[40] * 3)
    result = report(runs, tmp_path / "out")
    (row,) = result["table2"]
    assert row["baseline"] == "pruning=none, κ=0.3 (3 seeds)" and row["clean"] == pytest.approx(1.0)
    assert "its own 0% runs are listed in aggregated.csv" in (tmp_path / "out" / "summary.md").read_text()


def test_without_a_dense_run_the_methods_own_zero_is_the_baseline_and_says_so(tmp_path, write_run):
    runs = tmp_path / "runs"
    cell(runs, write_run, "m0", sparsity=0.0, cleans=[50] * 3, mads=[25] * 3, randoms=[40] * 3)
    cell(runs, write_run, "m30", sparsity=0.3, cleans=[60] * 3, mads=[40] * 3, randoms=[40] * 3)
    (row,) = report(runs, tmp_path / "out")["table2"]
    assert row["baseline"] == "magnitude 0%, κ=0.3 (3 seeds; no pruning=none run)" and row["zero_point"] == "own 0%"
    assert row["sweet_spot"] == 0.3 and row["clean"] == pytest.approx(60 / 50)
    assert row["robust_worst"] == pytest.approx(40 / 25)
    assert "no pruning=none run" in (tmp_path / "out" / "table2_sweet_spots.md").read_text()


# -- one run is one run; adversaries are not runs of the sweep ---------------------------------
def test_a_run_in_several_folders_counts_once(tmp_path, write_run):
    runs = tmp_path / "runs"
    hand_made(runs, write_run)
    # sweep=methods and sweep=interval writing the same run under their own names
    write_run(runs, "algo.kappa=0.3,pruning=magnitude,pruning.final_sparsity=0.3,seed=0", sparsity=0.3, seed=0,
              clean=95, attacks={"mad": 70, "random": 85})
    write_run(runs, "pruning.final_sparsity=0.3,pruning.interval=15,seed=0", sparsity=0.3, seed=0,
              clean=95, attacks={"mad": 70, "random": 85}, device="cuda")
    cfg_path = runs / "pruning.final_sparsity=0.3,pruning.interval=15,seed=0" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("skip_finished: false", "skip_finished: true"))
    # skip_finished moved an unfinished attempt aside before the run finished in its place
    shutil.copytree(runs / "m70_s2", runs / "m70_s2.partial-0")
    (runs / "m70_s2.partial-0" / "summary.json").unlink()
    # W&B's grid: pruning=none at four final sparsities trains one dense network
    for s in (0.3, 0.5, 0.7):
        write_run(runs, f"wandb_none_{s}_s0", method="none", sparsity=s, seed=0, clean=90,
                  attacks={"mad": 40, "random": 70})
    # a run copied by hand, re-run with different returns (a non-deterministic device)
    shutil.copytree(runs / "m70_s1", runs / "copy_of_m70_s1")
    summary = json.loads((runs / "copy_of_m70_s1" / "summary.json").read_text())
    summary["clean_return"] = 61.0
    (runs / "copy_of_m70_s1" / "summary.json").write_text(json.dumps(summary))
    result = report(runs, tmp_path / "out")
    assert result["runs"] == 9
    (row,) = result["table2"]
    assert row["seeds"] == 3 and row["clean"] == pytest.approx(1.0)  # unchanged by the copies
    groups = [sorted([Path(k).name, *(Path(o).name for o in others)]) for k, others, _ in result["duplicates"]]
    assert sorted(groups) == sorted([
        ["dense_s0", "wandb_none_0.3_s0", "wandb_none_0.5_s0", "wandb_none_0.7_s0"],
        ["algo.kappa=0.3,pruning=magnitude,pruning.final_sparsity=0.3,seed=0", "m30_s0",
         "pruning.final_sparsity=0.3,pruning.interval=15,seed=0"],
        ["copy_of_m70_s1", "m70_s1"], ["m70_s2", "m70_s2.partial-0"]])
    assert result["problems"] == []
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Duplicates" in md and "m70_s1: its returns differ (clean 60 vs 61)" in md
    assert "m70_s2.partial-0: no summary.json" in md
    status = {Path(r["run_dir"]).name: r["status"] for r in rows(tmp_path / "out" / "runs.csv")}
    assert status["wandb_none_0.5_s0"] == "duplicate" and status["dense_s0"] == "used"
    assert sorted(status.values()).count("used") == 9 and sorted(status.values()).count("duplicate") == 7


def test_cli_counts_one_run_copied_twice_as_one_seed(tmp_path, write_run):
    runs = tmp_path / "runs"
    write_run(runs, "dense", method="none", sparsity=0.0, clean=100, attacks={"mad": 50})
    d = write_run(runs, "a/pruned", sparsity=0.5, clean=110, attacks={"mad": 60})
    shutil.copytree(d, runs / "b" / "pruned")
    shutil.copytree(d, runs / "pruned_again")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "prunerl", "report", f"runs={runs}", f"out={out}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 runs (2 duplicate folders counted once" in r.stdout
    (row,) = rows(out / "table2_sweet_spots.csv")
    assert row["seeds"] == "1" and row["sweet_spot"] == "0.5"
    (cell_row,) = [x for x in rows(out / "aggregated.csv") if x["sparsity"] == "0.5"]
    assert cell_row["seeds"] == "1" and cell_row["seed_list"] == "0"


def test_learned_adversary_runs_are_skipped_not_read_as_dense_runs(tmp_path, write_run):
    runs = tmp_path / "runs"
    hand_made(runs, write_run)
    victim = runs / "m30_s0" / "checkpoints" / "last.ckpt"
    # evaluate's cache: <stem>.adversary-<key>/ beside the victim's checkpoint (κ = 0, dense)
    write_run(runs / "m30_s0" / "checkpoints", "last.adversary-3f2a", method="none", sparsity=0.0, kappa=0.0,
              clean=-5, attacks={}, victim=str(victim))
    # and one trained by hand with experiment=adversary elsewhere
    write_run(runs, "my_adversary", method="none", sparsity=0.0, kappa=0.0, clean=-3, attacks={}, victim=str(victim))
    (runs / "m30_s1" / ".hydra").mkdir()
    (runs / "m30_s1" / ".hydra" / "config.yaml").write_text("seed: ${oc.env:X}\n")  # Hydra's unresolved copy
    result = report(runs, tmp_path / "out")
    assert result["runs"] == 9 and len(result["skipped"]) == 2 and result["problems"] == []
    assert sorted(Path(p).name for p, _ in result["skipped"]) == ["last.adversary-3f2a", "my_adversary"]
    assert {r["kappa"] for r in result["table2"]} == {0.3}  # no κ = 0 curve made of adversaries
    assert result["table2"][0]["baseline"] == "pruning=none, κ=0.3 (3 seeds)"
    assert "## Skipped (not runs of the sweep)" in (tmp_path / "out" / "summary.md").read_text()


# -- settings that must not merge ---------------------------------------------------------------
@pytest.mark.parametrize("key, value, shown", [
    ("eps", 0.1, "eps=0.1"), ("frames", 409600, "frames=409600"), ("deterministic", False, "deterministic=False"),
    ("episodes", 50, "episodes=50"),
])
def test_runs_with_another_eps_budget_mode_or_episodes_are_reported_apart(tmp_path, write_run, key, value, shown):
    runs = tmp_path / "runs"
    hand_made(runs / "a", write_run)
    hand_made(runs / "b", write_run, **{key: value})
    result = report(runs, tmp_path / "out")
    assert result["settings"] == ["hopper-1", "hopper-2"]
    t2 = result["table2"]
    assert [r["setting"] for r in t2] == ["hopper-1", "hopper-2"]
    assert all(r["seeds"] == 3 and r["baseline_seeds"] == 3 and r["sweet_spot"] == 0.3 for r in t2)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert f"`{shown}`" in md
    assert (tmp_path / "out" / "fig2_frontier_hopper-1.png").is_file()
    assert (tmp_path / "out" / "fig2_frontier_hopper-2.png").is_file()


def test_tasks_are_reported_apart(tmp_path, write_run):
    runs = tmp_path / "runs"
    hand_made(runs / "hopper", write_run)
    hand_made(runs / "walker", write_run, env="walker2d")
    result = report(runs, tmp_path / "out")
    assert result["settings"] == ["hopper", "walker2d"] and [r["seeds"] for r in result["table2"]] == [3, 3]


# -- the stochastic evaluation's second Table 2 -------------------------------------------------
def test_stochastic_evaluation_gets_its_own_table2(tmp_path, write_run):
    runs = tmp_path / "runs"
    for seed in range(3):
        write_run(runs, f"dense_s{seed}", method="none", sparsity=0.0, seed=seed, clean=100, attacks={"mad": 50},
                  stochastic=(80, {"mad": 40}))
        write_run(runs, f"m50_s{seed}", sparsity=0.5, seed=seed, clean=90, attacks={"mad": 45},
                  stochastic=(88, {"mad": 60}))
    result = report(runs, tmp_path / "out")
    (det,) = result["table2"]
    (sto,) = result["table2_stochastic"]
    assert det["sweet_spot"] == 0.0 and det["evaluation"] == "deterministic"  # 0.9 / 0.9: pruning loses
    assert sto["sweet_spot"] == 0.5 and sto["evaluation"] == "stochastic"
    assert sto["clean"] == pytest.approx(88 / 80) and sto["robust_worst"] == pytest.approx(60 / 40)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Table 2 — sweet spots, stochastic evaluation" in md
    assert (tmp_path / "out" / "table2_sweet_spots_stochastic.csv").is_file()


def test_no_stochastic_table_without_stochastic_figures(tmp_path, write_run):
    runs = tmp_path / "runs"
    hand_made(runs, write_run)
    result = report(runs, tmp_path / "out")
    assert result["table2_stochastic"] == []
    assert not (tmp_path / "out" / "table2_sweet_spots_stochastic.csv").exists()
    assert "stochastic evaluation" not in (tmp_path / "out" / "summary.md").read_text()


# -- the verdict -------------------------------------------------------------------------------
@pytest.mark.parametrize("pruned, seeds, expect, overall", [
    ({"clean": 100, "mad": [80, 81, 82, 83, 84]}, 5, "present: at 30% the worst-attack return is 1.64× the baseline's "
     "(CI [", "**The effect is present** in hopper, κ=0.3, magnitude (Δt=15)."),
    ({"clean": 100, "mad": [40, 47, 55, 62, 70]}, 5, "not shown: worst-attack 1.10×, CI [",
     "**Not shown here**"),
    ({"clean": 90, "mad": [45, 45, 45, 45, 45]}, 5, "absent: no pruned sparsity scores above the unpruned run",
     "**The effect is absent here**"),
    ({"clean": 80, "mad": [80, 80, 80, 80, 80]}, 5, "robustness up but clean return down: worst-attack 1.60× (CI excludes 1), "
     "clean 0.80 < 0.95", "**The effect is absent here**"),
    ({"clean": 100, "mad": [80, 82, 84]}, 3, "undecided: worst-attack 1.64× with a CI excluding 1, but from 3 seeds",
     "**Undecided**"),
    # a negative verdict needs the same 5 seeds as a positive one
    ({"clean": 90, "mad": [45, 45, 45]}, 3, "undecided (3 seeds; a verdict needs ≥ 5) — so far absent: no pruned "
     "sparsity scores above the unpruned run", "**Undecided**"),
    ({"clean": 100, "mad": [40, 47, 55, 62]}, 4, "undecided (4 seeds; a verdict needs ≥ 5) — so far not shown: "
     "worst-attack 1.02×, CI [", "**Undecided**"),
])
def test_verdict_is_computed_from_the_figures(tmp_path, write_run, pruned, seeds, expect, overall):
    runs = tmp_path / "runs"
    for seed in range(seeds):
        write_run(runs, f"dense_s{seed}", method="none", sparsity=0.0, seed=seed, clean=100, attacks={"mad": 50})
        write_run(runs, f"m30_s{seed}", sparsity=0.3, seed=seed, clean=pruned["clean"],
                  attacks={"mad": pruned["mad"][seed]})
    result = report(runs, tmp_path / "out")
    (v,) = result["verdicts"]
    assert v["verdict_text"].startswith(expect), v["verdict_text"]
    md = (tmp_path / "out" / "summary.md").read_text()
    verdict = md[md.index("## Verdict"):md.index("## Table 2")]
    assert expect in verdict and overall in verdict
    # the paper's Hopper row of Table 2, magnitude
    assert "paper (SA-trained): 30%, clean 1.00, robust (worst) 1.63, norm. robust (avg) 1.26" in verdict


def test_verdict_compares_with_the_papers_row(tmp_path, write_run):
    runs = tmp_path / "runs"
    for seed in range(5):
        write_run(runs, f"dense_s{seed}", method="none", sparsity=0.0, seed=seed, clean=100, attacks={"mad": 50})
        write_run(runs, f"m30_s{seed}", sparsity=0.3, seed=seed, clean=100, attacks={"mad": [80, 81, 82, 83, 84][seed]})
    (v,) = report(runs, tmp_path / "out")["verdicts"]
    assert v["verdict_paper"].endswith("the paper's robust (worst) is inside our CI")  # 1.63 in the CI around 1.64
    assert v["verdict_effect"] is True and v["verdict_ci_excludes_1"] and v["verdict_clean_ok"]


# -- confidence intervals ----------------------------------------------------------------------
def test_t_quantiles_and_expanded_tails():
    assert _t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert _t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-3)
    assert _t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-3)
    assert expanded_tail(5, 0.95) == pytest.approx(0.000954, rel=1e-2)  # Φ(−√(5/4)·2.7764)
    assert expanded_tail(1000, 0.95) == pytest.approx(0.025, rel=1e-2)  # large n: the plain percentile


def test_expanded_bootstrap_interval_of_a_mean_has_a_t_intervals_width():
    """For a mean of n = 6 seeds, the interval is ≈ mean ± t₅·s/√6 (the plain percentile bootstrap
    would be ~30% narrower)."""
    x = np.array([3.0, 7.0, 1.0, 9.0, 4.0, 6.0])
    rng = np.random.default_rng(0)
    reps = x[rng.integers(0, 6, size=(20000, 6))].mean(axis=1)
    lo, hi = ci(np.concatenate([[x.mean()], reps]), 0.95, 6)
    half = 2.5706 * x.std(ddof=1) / math.sqrt(6)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert ci(np.concatenate([[x.mean()], reps]), 0.95, 1) == (pytest.approx(math.nan, nan_ok=True),) * 2


def test_a_single_seed_has_no_ci(tmp_path, write_run):
    runs = tmp_path / "runs"
    write_run(runs, "dense", method="none", sparsity=0.0, clean=100, attacks={"mad": 50})
    write_run(runs, "m50", sparsity=0.5, clean=110, attacks={"mad": 60})
    (row,) = report(runs, tmp_path / "out")["table2"]
    assert row["seeds"] == 1 and row["clean"] == pytest.approx(1.1)
    assert math.isnan(row["clean_lo"]) and math.isnan(row["robust_worst_hi"])
    assert row["sweet_spot"] == 0.5


def test_report_is_deterministic(tmp_path, write_run):
    runs = tmp_path / "runs"
    hand_made(runs, write_run)
    report(runs, tmp_path / "a")
    report(runs, tmp_path / "b")
    for name in ("table2_sweet_spots.csv", "table3_worst_seed.csv", "aggregated.csv", "summary.md"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name


# -- bad input: one line, nothing written -------------------------------------------------------
def _report_cfg(**kw):
    from prunerl.cli import CONF_DIR

    cfg = OmegaConf.load(Path(CONF_DIR) / "report.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("case, message", [
    ("no runs", "runs=DIR is required"),
    ("missing", "does not exist"),
    ("a file", "is a file, not a directory"),
    ("empty", "holds no run directories (no config.yaml below it)"),
    ("only failed", "holds 1 run directories but none with results"),
    ("out under a file", "cannot be created"),
    ("bad normalize", "normalize='paper' is not allowed; allowed: ['sa', 'same_kappa']"),
    ("absent baseline_kappa", "baseline_kappa=0.7: setting hopper has no runs at that κ (κ present: 0.3)"),
    ("bad ci", "ci=95 must lie in (0, 1), e.g. 0.95"),
])
def test_bad_report_input_is_one_clear_error_and_writes_nothing(tmp_path, write_run, case, message):
    from prunerl.cli import _report

    runs = tmp_path / "runs"
    runs.mkdir()
    out = tmp_path / "out"
    kw = {"runs": str(runs), "out": str(out)}
    if case == "no runs":
        kw["runs"] = None
    elif case == "missing":
        kw["runs"] = str(tmp_path / "nowhere")
    elif case == "a file":
        (tmp_path / "f.txt").write_text("x")
        kw["runs"] = str(tmp_path / "f.txt")
    elif case == "empty":
        (runs / "not_a_run").mkdir()
    elif case == "only failed":
        (runs / "crashed").mkdir()
        (runs / "crashed" / "config.yaml").write_text("seed: 0\n")
    else:
        hand_made(runs, write_run)
        if case == "out under a file":
            (tmp_path / "f.txt").write_text("x")
            kw["out"] = str(tmp_path / "f.txt" / "report")
        elif case == "bad normalize":
            kw["normalize"] = "paper"
        elif case == "absent baseline_kappa":
            kw["baseline_kappa"] = 0.7
        elif case == "bad ci":
            kw["ci"] = 95
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=None) as e:
        _report(_report_cfg(**kw))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert sorted(tmp_path.rglob("*")) == before and not out.exists()


def test_cli_bad_report_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "runs").mkdir()
    r = subprocess.run([sys.executable, "-m", "prunerl", "report", f"runs={tmp_path / 'runs'}",
                        f"out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: runs={tmp_path / 'runs'} holds no run directories "
                                             "(no config.yaml below it)"]
    assert not (tmp_path / "out").exists()


# -- the report on small real fits -------------------------------------------------------------
def test_report_on_small_real_runs(small_cfg, tmp_path):
    """Real (tiny) fits with pruning and the end-of-run evaluation, then the report on them; the
    sweet spot is checked against the figures recomputed here from the runs' summary.json."""
    from prunerl.fit import fit

    runs = tmp_path / "runs"
    for sparsity in (0.0, 0.5):
        for seed in (0, 1):
            fit(small_cfg("pruning=magnitude", f"pruning.final_sparsity={sparsity}", f"seed={seed}",
                          "evaluation.attacks=[random,mad]", "evaluation.episodes=2",
                          run_dir=runs / f"s{sparsity}_seed{seed}"))
    (runs / "crashed").mkdir()
    (runs / "crashed" / "config.yaml").write_text("env: {name: inverted_pendulum}\n")
    out = tmp_path / "report"
    result = report(runs, out)
    assert result["runs"] == 4
    assert [p for p, _ in result["problems"]] == [str(runs / "crashed")]
    (row,) = result["table2"]
    assert row["env"] == "inverted_pendulum" and row["method"] == "magnitude" and row["seeds"] == 2
    assert row["baseline"] == "magnitude 0%, κ=0.3 (2 seeds; no pruning=none run)"
    # recompute from the summaries: mean over seeds, normalised to the 0% runs
    s = {(sp, seed): json.loads((runs / f"s{sp}_seed{seed}" / "summary.json").read_text())
         for sp in (0.0, 0.5) for seed in (0, 1)}
    mean = lambda f, sp: np.mean([f(s[(sp, seed)]) for seed in (0, 1)])  # noqa: E731
    clean = mean(lambda x: x["clean_return"], 0.5) / mean(lambda x: x["clean_return"], 0.0)
    robust = np.mean([mean(lambda x: x["attack_returns"][a], 0.5) / mean(lambda x: x["attack_returns"][a], 0.0)
                      for a in ("random", "mad")])
    worst = mean(lambda x: min(x["attack_returns"].values()), 0.5) / mean(lambda x: min(x["attack_returns"].values()), 0.0)
    expected_spot = 0.5 if (clean + robust) / 2 > 1 else 0.0
    assert row["sweet_spot"] == expected_spot
    if expected_spot == 0.5:
        assert (row["clean"], row["norm_robust_avg"], row["robust_worst"]) == (
            pytest.approx(clean), pytest.approx(robust), pytest.approx(worst))
    else:
        assert (row["clean"], row["norm_robust_avg"], row["robust_worst"]) == (1.0, 1.0, 1.0)
    agg = {r["sparsity"]: r for r in rows(out / "aggregated.csv")}
    assert float(agg["0.5"]["norm_clean"]) == pytest.approx(clean)
    assert float(agg["0.5"]["lipschitz_mean"]) == pytest.approx(mean(lambda x: x["lipschitz_surrogate"], 0.5))
    for name in ("summary.md", "table2_sweet_spots.md", "table3_worst_seed.md", "aggregated.csv", "runs.csv",
                 "verdict.csv", "fig2_frontier_inverted_pendulum.png", "fig3_attacks_inverted_pendulum.png",
                 "lipschitz_inverted_pendulum.png", "certificates_inverted_pendulum.png"):
        assert (out / name).stat().st_size > 0, name
    assert float(agg["0.5"]["cert_crown_mean"]) == pytest.approx(
        mean(lambda x: x["certificates"]["crown"]["dmu"]["median"], 0.5))
    csv_text = (out / "aggregated.csv").read_text()
    for col in ("random_mean", "mad_mean_lo", "lipschitz_mean_hi", "bound_mean", "robust_worst_lo",
                "cert_ibp_mean", "cert_global_tv_mean_hi"):
        assert col in csv_text


def test_an_older_runs_l2_ball_figure_is_not_read_as_the_certified_bound(tmp_path, write_run):
    """Summaries from before the ℓ∞-ball bound hold α·c·L̃·ε for an ℓ2 ball of radius ε under
    `certified_bound`: the report reads the bound only where `certified_bound_ball` says "linf"."""
    from prunerl.runset import read_runs

    write_run(tmp_path, "new", clean=1.0, attacks={"mad": 1.0}, lipschitz=2.0, bound=30.0)
    write_run(tmp_path, "old", seed=1, clean=1.0, attacks={"mad": 1.0}, lipschitz=2.0, bound=10.0, ball=None)
    runs = {r.path.name: r for r in read_runs(tmp_path).runs}
    assert runs["new"].bound == 30.0 and runs["old"].bound is None
    assert runs["old"].lipschitz == 2.0  # L̃ itself is the same quantity in both


def test_per_state_certificates_vs_sparsity_and_older_runs_without_them(tmp_path, write_run):
    """Issue 14: the certificates figure and columns come from summary.json's ``certificates``;
    runs from before it (no such entry, no certificate keys in their config) are read, kept in the
    same setting, and get no figure."""
    import yaml

    from prunerl.runset import read_runs, settings

    new, old = tmp_path / "new", tmp_path / "old"
    for seed in (0, 1):
        for sp, cert in ((0.0, (1.0, 0.1, 30.0)), (0.5, (0.8, 0.05, 20.0))):
            write_run(new, f"m{sp}_s{seed}", sparsity=sp, seed=seed, clean=1.0, attacks={"mad": 1.0},
                      certificates=tuple(x * (1 + seed) for x in cert))
            d = write_run(old, f"m{sp}_s{seed}", sparsity=sp, seed=seed, clean=1.0, attacks={"mad": 1.0})
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            if seed:  # a config from before the certificate keys: still the same setting
                del cfg["callbacks"]["lipschitz"]["certificates"], cfg["callbacks"]["lipschitz"]["certificate_threshold"]
                (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert len(settings(read_runs(old).runs)) == 1
    runs = {r.path.name: r for r in read_runs(new).runs}
    assert runs["m0.5_s1"].certificates == {"cert_ibp": 1.6, "cert_crown": 0.1, "cert_global": 40.0,
                                            "cert_ibp_tv": 3.2, "cert_crown_tv": 0.2, "cert_global_tv": 80.0}
    r = report(new, tmp_path / "out_new", resamples=200)
    assert str(tmp_path / "out_new" / "certificates_hopper.png") in r["figures"]
    agg = {row["sparsity"]: row for row in rows(tmp_path / "out_new" / "aggregated.csv")}
    assert float(agg["0.5"]["cert_crown_mean"]) == pytest.approx(0.075)  # mean over seeds of 0.05, 0.1
    assert float(agg["0.0"]["cert_global_tv_mean"]) == pytest.approx(90.0)
    r = report(old, tmp_path / "out_old", resamples=200)
    assert r["runs"] == 4 and not any(Path(f).name.startswith("certificates") for f in r["figures"])
    assert rows(tmp_path / "out_old" / "aggregated.csv")[0]["cert_crown_mean"] == ""
