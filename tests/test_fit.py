"""Real `fit` runs on a MuJoCo task: the run-directory contract, exact resume, fresh weights."""

import json

import lightning as L
import pytest
import torch
import yaml

from prunerl.data import weights_fingerprint
from prunerl.fit import fit
from prunerl.rundir import SUMMARY_KEYS, read_metrics


class RecordActorAfterRollout(L.Callback):
    """The learner's actor weights after the last update of each rollout (class-level record,
    since Hydra builds the instance)."""

    records: list = []

    def on_train_epoch_end(self, trainer, pl_module):
        RecordActorAfterRollout.records.append((trainer.global_step, weights_fingerprint(pl_module.actor)))


def test_fit_writes_the_run_directory_contract(small_cfg, tmp_path):
    cfg = small_cfg("algo.kappa=0.3", "checkpoint.every_n_rollouts=1")
    summary = fit(cfg)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["env"]["id"] == "InvertedPendulum-v5"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("rollout*.ckpt"))) == 2
    on_disk = json.loads((run / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(on_disk)
    assert on_disk["frames"] == 2048 and summary["frames"] == 2048
    assert on_disk["env_id"] == "InvertedPendulum-v5" and on_disk["kappa"] == 0.3
    assert on_disk["sps"] > 0 and on_disk["train_return"] > 0
    rows = [r for r in read_metrics(run) if "train/frames" in r]  # (the evaluation logs its own rows)
    assert len(rows) == 2  # one row per rollout
    for key in ("loss/loss_objective", "loss/loss_critic", "loss/entropy", "ppo/approx_kl",
                "ppo/clip_fraction", "sa/loss_sa", "sa/sa_kl", "sa/sa_eps", "train/frames",
                "train/episode_return"):
        assert key in rows[-1], key
    assert rows[-1]["train/frames"] == 2048
    assert [r["step"] for r in rows] == [16, 32]  # t = rollouts × epochs × minibatches


def test_kappa_zero_skips_the_sa_loop(small_cfg, tmp_path, monkeypatch):
    from prunerl import module

    def must_not_run(*a, **k):
        raise AssertionError("the SA inner maximisation ran with κ = 0")

    monkeypatch.setattr(module, "sa_regularizer", must_not_run)
    summary = fit(small_cfg("algo.kappa=0"))
    assert summary["kappa"] == 0
    assert not any(k.startswith("sa/") for row in read_metrics(tmp_path / "run") for k in row)


def test_fast_sa_loop_trains_as_the_reference(small_cfg, tmp_path, monkeypatch):
    """A real fit (Hopper, 128×128 nets: the size from which the fast inner loop runs its hidden
    layer on oneDNN, where this torch has it, pruning on) with the fast inner loop and with the
    reference loop: the same SA loss and KL found, update by update, and the same run."""
    from prunerl import module, sa

    def run(impl):
        seen = []

        def spy(*a, **k):
            loss, kl = sa.sa_regularizer(*a, **{**k, "input_gradient": impl})
            seen.append(torch.stack([loss.detach(), kl]))
            on_onednn.append(any(onednn for *_, onednn in sa._fast_plan(a[0])))
            return loss, kl

        monkeypatch.setattr(module, "sa_regularizer", spy)
        summary = fit(small_cfg("env=hopper", "algo.model.hidden=[128,128]", "algo.sa.eps_ramp=0",
                                "++callbacks.evaluation=null", run_dir=tmp_path / impl))
        return torch.stack(seen), summary

    on_onednn = []
    fast, fast_summary = run("auto")
    assert set(on_onednn) == {sa._onednn_linear() is not None}
    ref, ref_summary = run("reference")
    assert fast.shape == ref.shape == (32, 2) and (ref[:, 0] > 0).all()   # 2 rollouts × 16 updates
    assert torch.allclose(fast[:, 0], ref[:, 0], rtol=1e-5, atol=0)       # R_SA
    assert torch.allclose(fast[:, 1], ref[:, 1], rtol=1e-4, atol=0)       # KL found
    assert fast_summary["train_return"] == pytest.approx(ref_summary["train_return"], rel=1e-4)
    assert fast_summary["sparsity"]["actor"] > 0.1   # the masks were on for part of the run


def test_rollouts_use_the_newest_weights(small_cfg, monkeypatch):
    from prunerl import fit as fit_mod

    seen = {}

    class Spy(fit_mod.RolloutDataModule):  # keep a handle on the datamodule the real fit builds
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["dm"] = self

    monkeypatch.setattr(fit_mod, "RolloutDataModule", Spy)
    RecordActorAfterRollout.records = []
    cfg = small_cfg("total_frames=4096", f"+callbacks.record._target_={__name__}.RecordActorAfterRollout")
    fit(cfg)
    log = seen["dm"].collection_log
    updates = 2 * 8  # epochs × minibatches per rollout
    # each rollout is collected after every update of the previous one (Lightning prefetches)...
    assert [t for t, _ in log] == [0, updates, 2 * updates, 3 * updates]
    # ...with the weights the learner had then, read off the collector's own policy
    after = dict(RecordActorAfterRollout.records)
    for t, fingerprint in log[1:]:
        assert fingerprint == after[t], t
    assert len({f for _, f in log}) == 4  # and the weights did change between rollouts


def test_resumed_run_matches_unsplit_run_exactly(small_cfg, tmp_path):
    full = small_cfg("total_frames=3072", "algo.kappa=0.3", "checkpoint.every_n_rollouts=1",
                     run_dir=tmp_path / "full")
    fit(full)
    ckpts = sorted((tmp_path / "full" / "checkpoints").glob("rollout*.ckpt"))
    assert len(ckpts) == 3
    split_at = ckpts[0]  # after the first rollout's updates
    # Another seed: every RNG stream must come from the checkpoint, or the runs diverge.
    resumed = small_cfg("total_frames=3072", "algo.kappa=0.3", "checkpoint.every_n_rollouts=1",
                        f"resume={split_at}", "seed=7", run_dir=tmp_path / "resumed")
    summary = fit(resumed)
    train_rows = [r for r in read_metrics(tmp_path / "resumed") if "train/frames" in r]
    assert [r["step"] for r in train_rows] == [32, 48]  # only rollouts 2, 3
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 3 * 16
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    dm_a, dm_b = a["RolloutDataModule"], b["RolloutDataModule"]
    assert dm_a["frames"] == dm_b["frames"] == summary["frames"] == 3072
    for k, v in dm_a["normalizer"].items():
        assert torch.equal(v, dm_b["normalizer"][k]), k
    assert dm_a["recent_returns"] == dm_b["recent_returns"]
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"])


def test_anneal_lr_falls_linearly_per_rollout_and_resumes(small_cfg, tmp_path):
    """algo.anneal_lr: rollout k of K trains at lr·(1 − k/K) (SA-PPO / CleanRL); a resumed run picks
    up the schedule where it stopped; without it the lr stays constant."""
    over = ("total_frames=4096", "algo.anneal_lr=true", "algo.lr=1e-3", "callbacks.evaluation=null",
            "checkpoint.every_n_rollouts=1")
    fit(small_cfg(*over, run_dir=tmp_path / "a"))
    lrs = [r["train/lr"] for r in read_metrics(tmp_path / "a") if "train/lr" in r]
    assert lrs == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    fit(small_cfg(*over, f"resume={tmp_path / 'a' / 'checkpoints' / 'rollout00001-t32.ckpt'}",
                  run_dir=tmp_path / "b"))
    assert [r["train/lr"] for r in read_metrics(tmp_path / "b") if "train/lr" in r] == pytest.approx([0.5e-3, 0.25e-3])
    fit(small_cfg("total_frames=4096", "algo.lr=1e-3", "callbacks.evaluation=null", run_dir=tmp_path / "c"))
    assert [r["train/lr"] for r in read_metrics(tmp_path / "c") if "train/lr" in r] == pytest.approx([1e-3] * 4)


def test_skip_finished_skips_the_same_finished_run_only(small_cfg, tmp_path):
    """Resumable sweeps: with skip_finished=true a finished run is not trained again (its files are
    untouched), a finished run of another config is refused, an unfinished one is continued in place
    from its newest good checkpoint, or moved aside when it has none."""
    from prunerl.config import ConfigError

    run = tmp_path / "run"
    over = ("skip_finished=true", "callbacks.evaluation=null")
    first = fit(small_cfg(*over))
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    again = fit(small_cfg(*over, "logger=none"))  # a logger does not change the run
    assert again["skipped"] is True and again["train_return"] == first["train_return"]
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    with pytest.raises(ConfigError, match="algo.kappa"):
        fit(small_cfg(*over, "algo.kappa=0.5"))
    with pytest.raises(ConfigError, match="already holds a run"):  # without the flag: refused as before
        fit(small_cfg("callbacks.evaluation=null"))

    (run / "summary.json").unlink()  # a run killed after its last checkpoint: continued in place
    third = fit(small_cfg(*over))
    assert "skipped" not in third and (run / "summary.json").is_file()
    assert third["resumed_from"] == str(run / "checkpoints" / "last.ckpt") and third["updates"] == first["updates"]
    assert not (tmp_path / "run.partial-0").exists()
    (run / "summary.json").unlink()  # and one without a good checkpoint: moved aside, started again
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(b"torn")
    fourth = fit(small_cfg(*over))
    assert fourth["resumed_from"] is None and (tmp_path / "run.partial-0" / "config.yaml").is_file()


@pytest.mark.parametrize("overrides, sigma, ent_coef, minibatches, frames, sa", [
    (["env=hopper"], 1.0, 0.01, 16, 512000, (5, 0.2)),   # minibatches of 128, 512k frames (conf/env/hopper.yaml), 5 SA steps of ε/5
    (["env=ant"], 0.3, 0.01, 32, 400000, (5, 0.2)),      # at σ = 1 Ant's control cost topples it
    (["env=halfcheetah"], 1.0, 0.0, 32, 400000, (5, 0.2)),  # entropy 0.01 holds HalfCheetah's σ near 1
    (["env=walker2d"], 1.0, 0.0, 32, 400000, (5, 0.2)),  # Walker2d learns better without it (conf/env/walker2d.yaml)
    (["env=ant", "algo.model.sigma=0.7"], 0.7, 0.01, 32, 400000, (5, 0.2)),   # the command line still wins
    (["env=hopper", "algo.minibatches=32", "total_frames=409600", "algo.sa.steps=10", "algo.sa.step_ratio=0.1"],
     1.0, 0.01, 32, 409600, (10, 0.1)),   # the reference's loop is two keys away
    (["experiment=repro_hopper"], 1.0, 0.01, 32, 400000, (10, 0.1)),  # the recipe its committed runs were trained with
    (["env=halfcheetah", "algo=paper"], 0.1, 0.01, 32, 400000, (10, 0.1)),     # the paper's recipe is its own (SA-PPO's loop)
    (["experiment=paper_ant"], 0.1, 0.01, 32, 50000000, (10, 0.1)),
    (["experiment=adversary", "env=hopper", "victim=null"], 0.5, 0.01, 32, 200000, (10, 0.1)),  # κ = 0; pinned for its cache key
])
def test_the_cpu_recipe_takes_its_settings_from_the_task(tmp_path, overrides, sigma, ent_coef, minibatches, frames, sa):
    from prunerl.config import validate_fit
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path / "run", *overrides)
    if "experiment=adversary" not in overrides:   # an adversary run needs a victim checkpoint to validate
        validate_fit(cfg)
    assert (cfg.algo.model.sigma, cfg.algo.ent_coef, cfg.algo.minibatches, cfg.total_frames) == (
        sigma, ent_coef, minibatches, frames)
    assert (cfg.algo.sa.steps, cfg.algo.sa.step_ratio) == sa
    # the run's config.yaml holds the values, not the interpolation
    from omegaconf import OmegaConf
    saved = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    assert (saved["algo"]["model"]["sigma"], saved["algo"]["ent_coef"], saved["algo"]["minibatches"]) == (
        sigma, ent_coef, minibatches)
