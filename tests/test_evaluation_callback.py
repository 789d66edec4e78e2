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
                              "evaluation.deterministic=false"))
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
    for key in ("eval/random/return", "eval/critic/return", "eval/mad/return", "eval/mad/perturbation"):
        assert key in rows[-1], key
    assert rows[-1]["eval/clean/return"] == on_disk["clean_return"]


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


def test_evaluate_round_trip_with_robust_sarsa_cache(victim, tmp_path):
    run, _ = victim
    ckpt = tmp_path / "victim.ckpt"
    ckpt.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    args = [f"checkpoint={ckpt}", "attacks=[random,critic,mad,rs]", "episodes=4", "eps=0.1",
            "rs.frames=512", "rs.epochs=2", "rs.minibatches=4"]
    out = evaluate(compose_cfg(None, *args, config_name="evaluate"))
    on_disk = json.loads((tmp_path / "victim.eval.json").read_text())
    assert on_disk["attack_returns"] == out["attack_returns"] and set(out["attack_returns"]) == {
        "random", "critic", "mad", "rs"}
    assert on_disk["eps"] == 0.1 and on_disk["deterministic"] is True and on_disk["clean"]["episodes"] == 4 and on_disk["frames_trained"] == 2048
    assert all(0.05 < r["mean_perturbation_linf"] <= 0.1 + 1e-6 for r in on_disk["attacks"].values())
    cached = list(tmp_path.glob("victim.rs_q-*.pt"))
    assert len(cached) == 1
    saved = torch.load(cached[0], weights_only=False)
    assert saved["settings"]["frames"] == 512 and len(saved["td_loss"]) == 3
    # the same evaluation again: the cached Q is reused (not retrained) and results repeat exactly
    mtime = cached[0].stat().st_mtime_ns
    again = evaluate(compose_cfg(None, *args, config_name="evaluate"))
    assert cached[0].stat().st_mtime_ns == mtime and list(tmp_path.glob("victim.rs_q-*.pt")) == cached
    assert again["attack_returns"] == out["attack_returns"] and again["clean_return"] == out["clean_return"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "prunerl", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_cli_evaluate_prints_a_table_for_a_directory(victim):
    run, _ = victim
    r = cli("evaluate", f"checkpoint={run / 'checkpoints'}", "attacks=[random,mad]", "episodes=2")
    assert r.returncode == 0, r.stderr
    assert "attack" in r.stdout and "clean" in r.stdout and "mad" in r.stdout and "ε=0.05" in r.stdout
    assert (run / "checkpoints" / "last.eval.json").is_file()
    assert json.loads((run / "checkpoints" / "last.eval.json").read_text())["episodes"] == 2


@pytest.mark.parametrize("args, message", [
    (["attacks=[random,fgsm]"], "attacks contains 'fgsm', which is not an attack; allowed: "
                                "['random', 'critic', 'mad', 'rs', 'optimal']"),
    (["eps=-0.1"], "eps=-0.1 is negative"),
    (["env=hopper"], "is a checkpoint of env=inverted_pendulum, but env=hopper was asked for"),
    (["checkpoint=/no/such.ckpt"], "checkpoint=/no/such.ckpt does not exist"),
    (["episodes=0"], "episodes=0 must be a positive integer"),
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
