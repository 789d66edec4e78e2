"""The adversarial-evaluation callback and `python -m prunerl evaluate`, on real small runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunerl.config import ConfigError
from prunerl.evaluate import evaluate
from prunerl.fit import fit
from prunerl.rundir import read_metrics
from tests.conftest import SMALL, compose_cfg

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    """One small real run (InvertedPendulum, 2,048 frames) with a periodic evaluation every rollout,
    with stochastic actions (they draw from torch's global RNG, which training also uses)."""
    run = tmp_path_factory.mktemp("victim") / "run"
    summary = fit(compose_cfg(run, *SMALL, "evaluation.every_frames=1024", "evaluation.episodes=4",
                              "evaluation.deterministic=false", "evaluation.stochastic=true"))
    return run, summary


def test_callback_logs_and_writes_summary(victim):
    run, summary = victim
    on_disk = json.loads((run / "summary.json").read_text())
    assert set(on_disk["attack_returns"]) == {"random", "critic", "mad"}  # the default, cheap set
    assert on_disk["clean_return"] == summary["clean_return"] > 0
    assert all(v > 0 for v in on_disk["attack_returns"].values())
    ev = on_disk["evaluation"]
    assert ev["deterministic"] is False and ev["eps"] == 0.05 and ev["episodes"] == 4 and ev["frames"] == 2048
    assert ev["steps"] == 10 and ev["step_size"] == pytest.approx(0.005)
    for name, size in ev["perturbation_linf"].items():  # every attack used (most of) its budget, no more
        assert 0.02 < size <= 0.05 + 1e-6, name
    rows = [r for r in read_metrics(run) if "eval/clean/return" in r]
    assert [r["step"] for r in rows] == [16, 32]  # every 1,024 frames; not again at the end
    for key in ("eval/random/return", "eval/critic/return", "eval/mad/return", "eval/mad/perturbation",
                "eval/robust/return", "eval/robust_avg/return", "eval_stochastic/mad/return"):
        assert key in rows[-1], key
    assert rows[-1]["eval/clean/return"] == on_disk["clean_return"]
    # the paper's robust figures: the worst attack and the mean over attacks
    attacks = on_disk["attack_returns"]
    assert on_disk["robust_return"] == min(attacks.values()) == attacks[ev["robust_attack"]]
    assert on_disk["robust_return_avg"] == pytest.approx(sum(attacks.values()) / 3)
    assert rows[-1]["eval/robust/return"] == on_disk["robust_return"]
    # exactly this shape (the report reads it); the primary table is already stochastic here
    assert on_disk["evaluation_stochastic"] == {"clean_return": on_disk["clean_return"], "attack_returns": attacks}


def test_periodic_evaluation_does_not_disturb_training(victim, tmp_path):
    """Same seed, no evaluation callback: bit-identical weights and RNG state (the callback restores
    torch's RNG and uses its own envs), although the first run evaluated stochastically mid-run."""
    run, _ = victim
    fit(compose_cfg(tmp_path / "plain", *SMALL, "callbacks.evaluation=null"))
    a = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "plain" / "checkpoints" / "last.ckpt", weights_only=False)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert torch.equal(a["RolloutDataModule"]["torch_rng"], b["RolloutDataModule"]["torch_rng"])


def test_evaluate_round_trip_with_robust_sarsa_scan_and_cache(victim, tmp_path):
    """``evaluate``'s defaults: deterministic and stochastic tables; Robust Sarsa scans its
    (ε_Q, reg) pairs, one cached Q each, and reports the strongest."""
    run, _ = victim
    ckpt = tmp_path / "victim.ckpt"
    ckpt.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    args = [f"checkpoint={ckpt}", "attacks=[random,critic,mad,rs]", "episodes=4", "eps=0.1",
            "rs.frames=512", "rs.epochs=2", "rs.minibatches=4", "rs.scan=[[0.02,0.1],[0.1,1.0],[0.3,10.0]]"]
    out = evaluate(compose_cfg(None, *args, config_name="evaluate"))
    on_disk = json.loads((tmp_path / "victim.eval.json").read_text())
    assert on_disk["attack_returns"] == out["attack_returns"] and set(out["attack_returns"]) == {
        "random", "critic", "mad", "rs"}
    assert on_disk["eps"] == 0.1 and on_disk["deterministic"] is True and on_disk["clean"]["episodes"] == 4 and on_disk["frames_trained"] == 2048
    assert all(0.05 < r["mean_perturbation_linf"] <= 0.1 + 1e-6 for r in on_disk["attacks"].values())
    # the scan: every pair's return recorded; `rs` is the lowest of them, with its pair
    scan = on_disk["rs_scan"]
    assert [(r["q_eps"], r["reg"]) for r in scan] == [(0.02, 0.1), (0.1, 1.0), (0.3, 10.0)]
    assert on_disk["attack_returns"]["rs"] == min(r["return"] for r in scan)
    strongest = min(scan, key=lambda r: r["return"])
    assert (on_disk["attacks"]["rs"]["q_eps"], on_disk["attacks"]["rs"]["reg"]) == (strongest["q_eps"], strongest["reg"])
    # robust figures in the JSON, and the stochastic table beside the deterministic one
    assert on_disk["robust_return"] == min(on_disk["attack_returns"].values())
    assert on_disk["robust_return_avg"] == pytest.approx(sum(on_disk["attack_returns"].values()) / 4)
    sto = on_disk["evaluation_stochastic"]
    assert set(sto["attack_returns"]) == {"random", "critic", "mad", "rs"} and sto["deterministic"] is False
    assert sto["attack_returns"]["rs"] == min(r["stochastic_return"] for r in scan)
    assert sto["robust_return"] == min(sto["attack_returns"].values())
    cached = sorted(tmp_path.glob("victim.rs_q-*.pt"))
    assert len(cached) == 3
    saved = [torch.load(c, weights_only=False) for c in cached]
    assert sorted((s["settings"]["q_eps"], s["settings"]["reg"]) for s in saved) == [(0.02, 0.1), (0.1, 1.0), (0.3, 10.0)]
    assert all(s["settings"]["frames"] == 512 and len(s["td_loss"]) == 3 for s in saved)
    # the same evaluation again: the cached Qs are reused (not retrained) and results repeat exactly
    mtimes = [c.stat().st_mtime_ns for c in cached]
    again = evaluate(compose_cfg(None, *args, config_name="evaluate"))
    assert [c.stat().st_mtime_ns for c in cached] == mtimes and sorted(tmp_path.glob("victim.rs_q-*.pt")) == cached
    assert again["attack_returns"] == out["attack_returns"] and again["clean_return"] == out["clean_return"]
    assert again["rs_scan"] == out["rs_scan"]


def test_the_stochastic_table_is_the_evaluation_with_sampled_actions(victim):
    """``stochastic: true`` beside a deterministic table gives exactly what a stochastic evaluation
    gives (same seeds), and leaves the deterministic table as it is without it."""
    from omegaconf import OmegaConf

    from prunerl.checkpoint import actor_from_checkpoint, critic_from_checkpoint, load_checkpoint
    from prunerl.evaluate import evaluate_policy

    run, _ = victim
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    actor, norm_state, _ = actor_from_checkpoint(ckpt)
    critic = critic_from_checkpoint(ckpt)
    settings = OmegaConf.load(ROOT / "conf" / "evaluation" / "default.yaml")
    settings.attacks, settings.episodes = ["random", "mad"], 3

    def run_with(deterministic, stochastic):
        settings.deterministic, settings.stochastic = deterministic, stochastic
        return evaluate_policy(actor, critic, norm_state, "inverted_pendulum", settings, log=lambda m: None)

    both, det, sto = run_with(True, True), run_with(True, False), run_with(False, False)
    assert "evaluation_stochastic" not in det
    assert both["attack_returns"] == det["attack_returns"] and both["clean_return"] == det["clean_return"]
    s = both["evaluation_stochastic"]
    assert s["clean_return"] == sto["clean_return"] and s["attack_returns"] == sto["attack_returns"]
    assert s["clean"]["returns"] != det["clean"]["returns"]  # sampled actions: another table


def cli(*args):
    return subprocess.run([sys.executable, "-m", "prunerl", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_cli_evaluate_prints_a_table_for_a_directory(victim):
    run, _ = victim
    r = cli("evaluate", f"checkpoint={run / 'checkpoints'}", "attacks=[random,mad]", "episodes=2")
    assert r.returncode == 0, r.stderr
    assert "attack" in r.stdout and "clean" in r.stdout and "mad" in r.stdout and "ε=0.05" in r.stdout
    assert "(deterministic and stochastic)" in r.stdout and "stochastic" in r.stdout.splitlines()[2]
    robust = next(line for line in r.stdout.splitlines() if line.startswith("robust"))
    assert "worst attack" in robust and any(line.startswith("avg") for line in r.stdout.splitlines())
    assert (run / "checkpoints" / "last.eval.json").is_file()
    assert json.loads((run / "checkpoints" / "last.eval.json").read_text())["episodes"] == 2


@pytest.mark.parametrize("args, message", [
    (["attacks=[random,fgsm]"], "attacks contains 'fgsm', which is not an attack; allowed: "
                                "['random', 'critic', 'mad', 'rs', 'optimal']"),
    (["eps=-0.1"], "eps=-0.1 is negative"),
    (["env=hopper"], "is a checkpoint of env=inverted_pendulum, but env=hopper was asked for"),
    (["checkpoint=/no/such.ckpt"], "checkpoint=/no/such.ckpt does not exist"),
    (["episodes=0"], "episodes=0 must be a positive integer"),
    (["rs.scan=[[0.02]]"], "rs.scan=[[0.02]] must be a non-empty list of [ε_Q, reg] pairs of numbers >= 0"),
    (["rs.scan=[]"], "rs.scan=[] must be a non-empty list of [ε_Q, reg] pairs"),
    (["stochastic=sometimes"], "stochastic='sometimes' must be true or false"),
    (["optimal.frames=0"], "optimal.frames=0 must be a positive integer"),
    (["optimal.seeds=[]"], "optimal.seeds=[] must be a non-empty list of integers"),
])
def test_evaluate_bad_input_is_one_error_before_any_rollout(victim, monkeypatch, args, message):
    import prunerl.evaluate as ev

    def no_rollouts(*a, **k):
        raise AssertionError("a rollout started")

    monkeypatch.setattr(ev, "run_episodes", no_rollouts)
    run, _ = victim
    cfg = compose_cfg(None, f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", *args, config_name="evaluate")
    with pytest.raises(ConfigError) as e:
        evaluate(cfg)
    assert message in str(e.value)


def test_cli_evaluate_bad_attack_is_one_line_exit_2(victim):
    run, _ = victim
    r = cli("evaluate", f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", "attacks=[pgd]")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: attacks contains 'pgd', which is not an attack")


@pytest.mark.parametrize("overrides, message", [
    (["evaluation.attacks=[random,bogus]"], "evaluation.attacks contains 'bogus', which is not an attack"),
    (["evaluation.eps=-1"], "evaluation.eps=-1 is negative"),
    (["evaluation.episodes=0"], "evaluation.episodes=0 must be a positive integer"),
    (["evaluation.rs.scan=[[0.02,-1]]"], "evaluation.rs.scan=[[0.02, -1]] must be a non-empty list of [ε_Q, reg] pairs"),
    (["experiment=adversary"], "experiment=adversary needs victim=PATH"),
    (["experiment=adversary", "victim=/no/such.ckpt"], "victim=/no/such.ckpt does not exist"),
])
def test_fit_bad_evaluation_input_fails_before_anything_is_written(tmp_path, overrides, message):
    cfg = compose_cfg(tmp_path / "run", *SMALL, *overrides)
    with pytest.raises(ConfigError) as e:
        fit(cfg)
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_adversary_against_a_victim_of_another_task(victim, tmp_path):
    run, _ = victim
    small = [o for o in SMALL if not o.startswith("env=")]
    cfg = compose_cfg(tmp_path / "adv", *small, "experiment=adversary", "env=hopper",
                      f"victim={run / 'checkpoints' / 'last.ckpt'}")
    with pytest.raises(ConfigError, match="is a checkpoint of env=inverted_pendulum, but this run is env=hopper"):
        fit(cfg)
    assert not (tmp_path / "adv").exists()


def test_adversary_run_writes_its_training_curve(victim, tmp_path):
    """A (tiny) learned-adversary run logs the victim's return per rollout and plots it with the
    adversary's return against frames in adversary_curve.png at the end of its fit."""
    run, _ = victim
    out = tmp_path / "adv"
    summary = fit(compose_cfg(out, *SMALL, "experiment=adversary", f"victim={run / 'checkpoints' / 'last.ckpt'}",
                              "adversary.eps=0.1"))
    rows = [r for r in read_metrics(out) if "adversary/victim_return" in r]
    assert [r["train/frames"] for r in rows] == [1024, 2048]
    # InvertedPendulum pays the victim 1 per step: its return is an episode length, whole numbers ≥ 1
    assert all(r["adversary/victim_return"] >= 1 and r["adversary/victim_episodes"] >= 1 for r in rows)
    assert summary["adversary_victim_return"] == pytest.approx(
        sum(r["adversary/victim_return"] for r in rows) / len(rows))
    png = out / "adversary_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_robust_figures_are_the_worst_attack_and_the_mean_over_attacks():
    from prunerl.evaluate import robust_figures

    assert robust_figures(3000.0, {"random": 2900.0, "mad": 1500.0, "rs": 800.0, "critic": 1800.0}) == {
        "robust_return": 800.0, "robust_attack": "rs", "robust_return_avg": 1750.0}
    assert robust_figures(3000.0, {}) == {"robust_return": None, "robust_attack": None, "robust_return_avg": None}


def test_an_adversary_config_from_a_victim_of_an_older_version_is_valid(victim, tmp_path):
    """The adversary's config starts from the victim's own; a victim trained before
    ``evaluation.rs.scan`` existed (rs.reg, rs.q_eps) must still get a valid adversary config, with
    only the adversary's own callback, and ``evaluation.optimal``'s settings in it."""
    from omegaconf import OmegaConf

    from prunerl.config import validate_fit
    from prunerl.trained_attacks import adversary_config

    run, _ = victim
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    rs = ckpt["prunerl"]["config"]["evaluation"]["rs"]
    rs.pop("scan")
    rs.update(reg=0.1, q_eps=0.02)
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    settings = OmegaConf.load(ROOT / "conf" / "evaluation" / "default.yaml")
    settings.optimal.frames, settings.optimal.similarity = 4096, 2.5
    cfg = adversary_config(old, 0.1, settings, seed=7)
    cfg.victim, cfg.run_dir = str(old), str(tmp_path / "adv")
    validate_fit(cfg)
    assert list(cfg.callbacks) == ["adversary_curve"] and cfg.pruning.criterion == "none"
    assert cfg.total_frames == 4096 and cfg.adversary.similarity == 2.5 and cfg.adversary.eps == 0.1
    assert cfg.seed == 7


def test_evaluate_reports_the_strongest_of_the_learned_adversaries(victim, tmp_path):
    """One (tiny) adversary per seed of ``optimal.seeds``, each cached in its own run directory
    with its training curve; ``optimal`` is the lowest return, every seed's is under optimal_scan."""
    run, _ = victim
    ckpt = tmp_path / "victim.ckpt"
    ckpt.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    out = evaluate(compose_cfg(None, f"checkpoint={ckpt}", "attacks=[optimal]", "episodes=6", "eps=1.0",
                               "stochastic=false", "optimal.frames=2048", "optimal.seeds=[0,1,2]",
                               config_name="evaluate"))
    scan = out["optimal_scan"]
    assert [r["seed"] for r in scan] == [0, 1, 2]
    assert len({r["return"] for r in scan}) > 1  # the seeds' adversaries differ: the choice matters
    assert out["attacks"]["optimal"]["seed"] == min(scan, key=lambda r: r["return"])["seed"]
    assert out["attack_returns"]["optimal"] == min(r["return"] for r in scan) == out["robust_return"]
    runs = sorted(tmp_path.glob("victim.adversary-*"))
    assert len(runs) == 3 and all((r / "adversary_curve.png").is_file() for r in runs)
    assert sorted(json.loads((r / "summary.json").read_text())["seed"] for r in runs) == [0, 1, 2]


def test_attacks_use_the_runs_own_env_eps(tmp_path):
    """env.eps=0.2 (the SA ball's and the certified bound's ε): the attacks default to it too, in the
    fit callback and in `evaluate` — not to the task's registered 0.05."""
    run = tmp_path / "run"
    summary = fit(compose_cfg(run, *SMALL, "env.eps=0.2", "evaluation.episodes=2", "evaluation.attacks=[random]"))
    assert summary["evaluation"]["eps"] == 0.2 and summary["certified_bound_eps"] == 0.2
    assert summary["evaluation"]["perturbation_linf"]["random"] > 0.05
    cfg = compose_cfg(None, f"checkpoint={run / 'checkpoints' / 'last.ckpt'}", "episodes=2", "attacks=[random]",
                      "stochastic=false", config_name="evaluate")
    assert evaluate(cfg)["eps"] == 0.2


def test_a_diverged_learned_adversary_is_left_out_not_retried_as_a_preemption(victim, tmp_path, monkeypatch):
    """An adversary whose training diverges (here: seed 0 trained with lr=1e30) is left out of the
    optimal attack with a warning; evaluating again reads its diverged run and does not retrain it
    (before the fix it raised Interrupted: exit 75, and a requeue loop under SLURM). When every
    seed diverges, a clear error."""
    import prunerl.trained_attacks as T

    real = T.adversary_config

    def seed0_diverges(victim_path, eps, settings, seed):
        cfg = real(victim_path, eps, settings, seed)
        if seed == 0:
            cfg.algo.lr = 1e30
        return cfg

    monkeypatch.setattr(T, "adversary_config", seed0_diverges)
    run, _ = victim
    ckpt = tmp_path / "victim.ckpt"
    ckpt.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    args = (f"checkpoint={ckpt}", "attacks=[optimal]", "episodes=2", "stochastic=false", "optimal.frames=2048")
    out = evaluate(compose_cfg(None, *args, "optimal.seeds=[0,1]", config_name="evaluate"))
    assert [r["seed"] for r in out["optimal_scan"]] == [1]
    diverged = [json.loads((r / "summary.json").read_text()) for r in tmp_path.glob("victim.adversary-*")]
    assert sorted(s["status"] for s in diverged) == ["diverged", "finished"]
    again = evaluate(compose_cfg(None, *args, "optimal.seeds=[0,1]", config_name="evaluate"))
    assert again["attack_returns"] == out["attack_returns"]
    with pytest.raises(T.AdversaryDiverged, match=r"every learned adversary diverged \(seed 0: "):
        evaluate(compose_cfg(None, *args, "optimal.seeds=[0]", config_name="evaluate"))
