"""Pruning: the cubic schedule, ERK, criteria and masks; the callback inside real `fit` runs."""

import math

import pytest
import torch

from callbacks.pruning import CHECKS, PruningCallback
from prunerl.config import ConfigError
from prunerl.fit import fit
from prunerl.pruning import (compute_masks, cubic_sparsity, erk_densities, is_mask_update,
                             layer_prune_counts, saliency_scores, schedule_bounds, sparsity_of)
from prunerl.rundir import read_metrics
from tests.conftest import FakeTrainer, TinyModule, callback_steps


def test_cubic_schedule_matches_zhu_gupta_formula():
    t0, t1, sf = 100, 400, 0.7
    for t in range(0, 500, 7):
        if t <= t0:
            expected = 0.0
        elif t >= t1:
            expected = sf
        else:  # s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³ with s_i = 0
            expected = sf - sf * (1 - (t - t0) / (t1 - t0)) ** 3
        assert cubic_sparsity(t, t0, t1, sf) == pytest.approx(expected, abs=1e-12), t
    # monotone, and fast early: half the ramp already gives 7/8 of the final sparsity
    assert cubic_sparsity(250, t0, t1, sf) == pytest.approx(sf * 7 / 8)


def test_schedule_bounds_and_mask_update_times():
    t_start, t_end = schedule_bounds(1000, 0.25, 0.75)
    assert (t_start, t_end) == (250, 750)
    micro = [t for t in range(1, 1001) if is_mask_update(t, t_start, t_end, 15)]
    assert micro[0] == 265 and micro[-1] == 750 and all(b - a <= 15 for a, b in zip(micro, micro[1:]))
    assert [t for t in range(1, 1001) if is_mask_update(t, t_start, t_end, 0)] == [251]  # one-shot


def test_erk_meets_the_total_and_keeps_would_be_dense_layers_dense():
    shapes = [(256, 17), (256, 256), (6, 256)]  # (out, in) of a 17-256-256-6 MLP
    sizes = [o * i for o, i in shapes]
    d = erk_densities(shapes, 0.1)  # 90% sparsity
    assert sum(di * n for di, n in zip(d, sizes)) == pytest.approx(0.1 * sum(sizes))
    assert d[2] == 1.0  # the output layer would exceed density 1: kept dense
    assert 1 - d[1] == pytest.approx(0.94, abs=0.01)  # REFERENCE.md: the 256×256 layer ~94% pruned
    # integer counts add up exactly
    counts = layer_prune_counts(shapes, 0.9, "erk")
    assert sum(counts) == round(0.9 * sum(sizes)) and counts[2] == 0


def test_layer_allocation_prunes_each_layer_equally():
    shapes = [(64, 8), (64, 64), (2, 64)]
    counts = layer_prune_counts(shapes, 0.5, "layer")
    assert counts == [256, 2048, 64]


@pytest.mark.parametrize("allocation", ["global", "layer", "erk"])
def test_masks_hit_the_target_and_only_ever_remove_weights(allocation):
    g = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(32, 8, generator=g), "b": torch.randn(32, 32, generator=g), "c": torch.randn(3, 32, generator=g)}
    prev = None
    for s in (0.2, 0.5, 0.8):
        m = compute_masks({k: v.abs() for k, v in w.items()}, s, allocation, prev)
        assert sparsity_of(m) == pytest.approx(s, abs=1 / 1000)
        if prev is not None:
            for k in m:
                assert not (m[k] & ~prev[k]).any()  # nothing pruned comes back
        w = {k: v * m[k] for k, v in w.items()}
        prev = m


@pytest.mark.parametrize("allocation", ["global", "layer", "erk"])
@pytest.mark.parametrize("shapes", [[(64, 4), (64, 64), (1, 64)], [(64, 11), (64, 64), (3, 64)], [(256, 17), (256, 256), (1, 256)]])
def test_nested_masks_prune_exactly_the_scheduled_number_at_every_update(shapes, allocation):
    # The per-layer rounding of the shares is not monotone in the sparsity (a layer's count can
    # dip by one as the target rises); nested masks must still prune round(s·N) in all, not more.
    g = torch.Generator().manual_seed(0)
    w = {str(i): torch.randn(shape, generator=g) for i, shape in enumerate(shapes)}
    total = sum(v.numel() for v in w.values())
    prev = None
    for t in range(65, 193):  # every update of a cubic ramp from 64 to 192
        s = cubic_sparsity(t, 64, 192, 0.9)
        m = compute_masks({k: v.abs() for k, v in w.items()}, s, allocation, prev)
        assert sum(int((~x).sum()) for x in m.values()) == round(s * total), (t, s)
        if prev is not None:
            assert not any((m[k] & ~prev[k]).any() for k in m)
        prev = m


def test_layer_counts_honour_what_each_layer_already_pruned_and_keep_the_total():
    # 2 layers of 16 at 25%: 4 each — but the first already pruned 6 (say, the masks came from
    # global allocation): it keeps its 6 and the other gives the difference back
    assert layer_prune_counts([(4, 4), (4, 4)], 0.25, "layer") == [4, 4]
    assert layer_prune_counts([(4, 4), (4, 4)], 0.25, "layer", at_least=[6, 0]) == [6, 2]
    assert layer_prune_counts([(4, 4), (4, 4)], 0.25, "layer", at_least=[6, 3]) == [6, 3]  # 9 > 8: no fewer
    g = torch.Generator().manual_seed(1)
    w = {"a": torch.randn(8, 8, generator=g), "b": torch.randn(8, 8, generator=g) * 10}
    prev = compute_masks({k: v.abs() for k, v in w.items()}, 0.3, "global")  # mostly layer a
    assert int((~prev["a"]).sum()) > 25
    m = compute_masks({k: v.abs() for k, v in w.items()}, 0.4, "layer", prev)
    assert sum(int((~x).sum()) for x in m.values()) == round(0.4 * 128)
    assert not any((m[k] & ~prev[k]).any() for k in m)


def test_saliency_ranks_by_abs_weight_times_gradient():
    w = {"l": torch.tensor([[1.0, -4.0, 0.5, 2.0]])}
    g = {"l": torch.tensor([[3.0, 0.1, -10.0, -0.2]])}
    scores = saliency_scores(w, g)
    assert torch.equal(scores["l"], torch.tensor([[3.0, 0.4, 5.0, 0.4]]))
    keep = compute_masks(scores, 0.5, "layer")["l"]
    # |w| would keep -4.0 and 2.0; |w·g| keeps 1.0 (score 3) and 0.5 (score 5)
    assert keep.tolist() == [[True, False, True, False]]


def test_masked_weights_stay_exactly_zero_after_many_adam_steps():
    module, trainer = TinyModule(total_updates=400), FakeTrainer()
    cb = PruningCallback("magnitude", final_sparsity=0.6, burn_in=0.0, end=0.1, interval=5)
    cb.setup(trainer, module)
    callback_steps(module, cb, trainer, 40)  # past t_end = 40: final masks in place
    masks = {n: m.clone() for n, m in cb.masks.items()}
    callback_steps(module, cb, trainer, 300)  # Adam's moments keep pushing on the pruned entries
    for n, p in cb.params.items():
        assert torch.equal(cb.masks[n], masks[n])
        assert (p[~masks[n]] == 0).all(), n
        assert (p[masks[n]] != 0).all(), n  # ... and the kept ones did train
    assert sparsity_of(cb.masks) == pytest.approx(0.6, abs=1e-3)


def test_magnitude_ste_lets_a_pruned_weight_come_back():
    module, trainer = TinyModule(total_updates=1000), FakeTrainer()
    cb = PruningCallback("magnitude_ste", final_sparsity=0.5, burn_in=0.0, end=0.5, interval=10)
    cb.setup(trainer, module)
    callback_steps(module, cb, trainer, 10)  # first mask update at t = 10
    name = "actor.mean_net.2.weight"
    pruned = ~cb.masks[name]
    i = tuple(pruned.nonzero()[0].tolist())
    assert module.actor.mean_net[2].weight[i] == 0
    cb.dense[name][i] = 100.0  # as if straight-through gradients had grown it
    callback_steps(module, cb, trainer, 10)  # next mask update at t = 20
    assert cb.masks[name][i] and module.actor.mean_net[2].weight[i] != 0
    assert cb.regrown >= 1
    # the forward always uses W⊙M: between steps the module holds masked weights only
    for n, p in cb.params.items():
        assert (p[~cb.masks[n]] == 0).all()


def test_magnitude_without_ste_never_brings_a_weight_back():
    module, trainer = TinyModule(total_updates=1000), FakeTrainer()
    cb = PruningCallback("magnitude", final_sparsity=0.5, burn_in=0.0, end=0.5, interval=10)
    cb.setup(trainer, module)
    callback_steps(module, cb, trainer, 10)
    name = "actor.mean_net.2.weight"
    before = cb.masks[name].clone()
    callback_steps(module, cb, trainer, 100)
    assert not (cb.masks[name] & ~before).any()


@pytest.mark.parametrize("overrides, message", [
    (["pruning.final_sparsity=1.0"], "pruning.final_sparsity=1.0 is outside [0, 1)"),
    (["pruning.final_sparsity=-0.1"], "pruning.final_sparsity=-0.1 is outside [0, 1)"),
    (["pruning.burn_in=1.2"], "pruning.burn_in=1.2 is outside [0, 1)"),
    (["pruning.interval=-1"], "pruning.interval=-1 must be an integer >= 0"),
    (["pruning.criterion=lottery"], "pruning.criterion='lottery' is not allowed"),
    (["pruning.scope=policy"], "pruning.scope='policy' is not allowed"),
    (["pruning.allocation=uniform"], "pruning.allocation='uniform' is not allowed"),
])
def test_bad_pruning_config_fails_before_anything_is_written(small_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        fit(small_cfg(*overrides))
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


# -- real fits ---------------------------------------------------------------------------------
FIT = ["total_frames=4096", "pruning.final_sparsity=0.7", "algo.kappa=0", "++callbacks.evaluation=null"]


@pytest.mark.parametrize("criterion", ["random", "magnitude", "magnitude_ste", "saliency"])
def test_real_fit_reaches_its_target_sparsity_and_passes_the_integrity_checks(small_cfg, tmp_path, criterion):
    summary = fit(small_cfg(*FIT, f"pruning={criterion}"))
    n_layers = 6
    sp = summary["sparsity"]
    assert summary["pruning_method"] == criterion and summary["final_sparsity"] == 0.7
    for key in ("global", "actor", "critic"):  # exact zeros in the weights, not just the masks
        assert sp[key] == pytest.approx(0.7, abs=n_layers / 8000), key
    assert sp["layers"]["actor.mean_net.0"] < sp["layers"]["actor.mean_net.2"]  # ERK: small layers denser
    lip = summary["lipschitz"]
    assert lip["mask_updates"] == summary["pruning"]["mask_updates"] == 3
    # every check can count (tests/test_pruning_integrity.py injects each fault); here, none
    assert summary["pruning_checks"] == dict.fromkeys(CHECKS, 0) and lip["thm1_sanity_violations"] == 0
    assert summary["lipschitz_surrogate"] > 0 and summary["certified_bound"] > 0
    rows = [r for r in read_metrics(tmp_path / "run") if "train/frames" in r]  # (evaluation rows apart)
    assert len(rows) == 4  # still one row per rollout
    assert rows[-1]["prune/target_sparsity"] == 0.7
    assert rows[0]["prune/sparsity"] == 0.0 and rows[-1]["prune/sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert {f"prune/checks/{k}" for k in CHECKS} <= set(rows[-1])
    assert "lipschitz/thm1_sanity_violations" in rows[-1]


def test_one_shot_and_micro_pruning_reach_the_same_final_sparsity(small_cfg, tmp_path):
    one = fit(small_cfg(*FIT, "pruning.interval=0", run_dir=tmp_path / "one"))
    micro = fit(small_cfg(*FIT, "pruning.interval=5", run_dir=tmp_path / "micro"))
    assert one["pruning"]["mask_updates"] == 1 and micro["pruning"]["mask_updates"] > 3
    assert one["sparsity"]["global"] == pytest.approx(micro["sparsity"]["global"], abs=1e-9)
    assert one["sparsity"]["global"] == pytest.approx(0.7, abs=1e-3)
    # one-shot jumped to 0.7 right after burn-in (t_start + 1 = 17): the first rollout's row has it
    assert read_metrics(tmp_path / "one")[1]["prune/sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_pruning_none_is_the_dense_baseline(small_cfg):
    summary = fit(small_cfg(*FIT, "pruning=none"))
    assert summary["pruning_method"] == "none" and summary["final_sparsity"] == 0.0
    assert summary["sparsity"]["global"] == 0.0
    assert summary["lipschitz"]["mask_updates"] == 0 and summary["lipschitz_surrogate"] > 0


def test_checkpoint_round_trip_restores_masks_and_schedule_position(small_cfg, tmp_path):
    # 3 rollouts of 16 updates: t_start = 12, t_end = 36; mask updates at 19, 26, 33, 36. The split
    # at t = 32 falls mid-ramp and mid saliency window (sums of |w·g| over t = 27..32 pending).
    common = ["total_frames=3072", "pruning.final_sparsity=0.7", "pruning.interval=7",
              "pruning=saliency", "checkpoint.every_n_rollouts=1", "++callbacks.evaluation=null"]
    fit(small_cfg(*common, run_dir=tmp_path / "full"))
    ckpts = sorted((tmp_path / "full" / "checkpoints").glob("rollout*.ckpt"))
    mid = torch.load(ckpts[1], weights_only=False)  # after t = 32
    state = mid["callbacks"]["PruningCallback"]
    assert state["mask_updates"] == 2 and 0 < state["target"] < 0.7
    assert state["saliency_count"] == 6 and state["saliency_sum"]
    for n, m in state["masks"].items():  # the checkpoint's weights are the masked weights
        assert (mid["state_dict"][n][~m] == 0).all()
    summary = fit(small_cfg(*common, f"resume={ckpts[1]}", "seed=3", run_dir=tmp_path / "resumed"))
    assert summary["pruning"]["mask_updates"] == 4  # continued the schedule: t = 33 and 36
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    ma, mb = a["callbacks"]["PruningCallback"]["masks"], b["callbacks"]["PruningCallback"]["masks"]
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    la, lb = a["callbacks"]["LipschitzCallback"], b["callbacks"]["LipschitzCallback"]
    assert la["thm1_violations"] == lb["thm1_violations"] == 0 and la["mask_updates"] == lb["mask_updates"] == 4
    assert la["log_change"] == lb["log_change"] and la["after_last_update"] == lb["after_last_update"]
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for k in sa:  # Adam's moments too (pruned entries' zeroed at mask updates and on resume)
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) and torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    assert summary["pruning_checks"] == dict.fromkeys(CHECKS, 0)
    assert math.isclose(la["at_pruning_start"]["actor"], lb["at_pruning_start"]["actor"])


def test_scope_actor_prunes_only_the_actors_weight_matrices():
    module, trainer = TinyModule(total_updates=100), FakeTrainer()
    cb = PruningCallback("magnitude", final_sparsity=0.5, burn_in=0.0, end=0.2, interval=5, scope="actor")
    cb.setup(trainer, module)
    callback_steps(module, cb, trainer, 30)
    assert set(cb.masks) == {"actor.mean_net.0.weight", "actor.mean_net.2.weight", "actor.mean_net.4.weight"}
    rep = cb.sparsity_report(module)
    assert rep["actor"] == pytest.approx(0.5, abs=1e-3) and rep["critic"] == 0.0
    assert all((m.bias != 0).all() for m in module.actor.mean_net if isinstance(m, torch.nn.Linear))  # biases untouched
