"""Structured (neuron) pruning (issue 14, item 3): whole hidden units go — row of W_ℓ, bias entry,
column of W_ℓ₊₁ — on the elementwise methods' schedule, the target counted in weights, through the
same mask machinery and integrity checks; and the report lists the method beside the others."""

import pytest
import torch

from callbacks.pruning import CHECKS, PruningCallback
from prunerl.config import ConfigError
from prunerl.fit import fit
from prunerl.pruning import (cubic_sparsity, neuron_counts, neuron_masks, neuron_scores, unit_tolerance,
                             zeroed_by_units)
from prunerl.report import report
from prunerl.rundir import read_metrics
from tests.conftest import FakeTrainer, TinyModule, callback_steps
from tests.test_report import base_cfg, write_run  # noqa: F401 — fixtures: run directories as `fit` writes them

SHAPES = [[(64, 4), (64, 64), (1, 64)], [(256, 11), (256, 256), (3, 256)], [(32, 5), (48, 32), (16, 48), (2, 16)]]


def _structured(weights, masks, units):
    """Every weight mask is exactly (row kept) ∧ (column kept) of the unit keep-vectors."""
    for ell, m in enumerate(masks):
        rows = units[ell] if ell < len(units) else torch.ones(m.shape[0], dtype=torch.bool)
        cols = units[ell - 1] if ell > 0 else torch.ones(m.shape[1], dtype=torch.bool)
        assert torch.equal(m, rows[:, None] & cols[None, :]), ell


@pytest.mark.parametrize("shapes", SHAPES)
def test_neuron_masks_remove_whole_units_evenly_nested_and_to_the_weight_target(shapes):
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(s, generator=g) for s in shapes]
    total = sum(x.numel() for x in w)
    tol = unit_tolerance(shapes)
    hidden = [o for o, _ in shapes[:-1]]
    prev = None
    for t in range(65, 193, 4):  # a cubic ramp to 90%
        s = cubic_sparsity(t, 64, 192, 0.9)
        masks, units = neuron_masks(w, s, prev)
        _structured(w, masks, units)
        pruned = sum(int((~m).sum()) for m in masks)
        assert abs(pruned - round(s * total)) <= tol, (t, s)  # the target counts weights
        removed = [int((~u).sum()) for u in units]
        assert pruned == zeroed_by_units(shapes, removed)
        fractions = [r / h for r, h in zip(removed, hidden)]
        assert max(fractions) - min(fractions) <= max(1 / h for h in hidden) + 1e-12  # evenly over layers
        if prev is not None:
            assert not any((u & ~p).any() for u, p in zip(units, prev))  # nothing comes back
        w = [x * m for x, m in zip(w, masks)]
        prev = units
    assert all(u.any() for u in prev)  # every layer keeps a unit


def test_the_lowest_incoming_times_outgoing_units_go_first():
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(8, 3, generator=g), torch.randn(8, 8, generator=g), torch.randn(2, 8, generator=g)]
    w[0][5] *= 1e-3      # unit 5 of layer 0: tiny incoming weights
    w[1][:, 2] *= 1e-3   # unit 2 of layer 0: tiny outgoing weights
    w[2][:, 6] *= 1e-3   # unit 6 of layer 1: tiny outgoing weights
    scores = neuron_scores(w)
    assert torch.allclose(scores[0][5], w[0][5].norm() * w[1][:, 5].norm())
    counts = neuron_counts([tuple(x.shape) for x in w], 0.35)  # 36 of 104 weights: 37 with [2, 2]
    assert counts == [2, 2]
    _, units = neuron_masks(w, 0.35)
    assert set(torch.nonzero(~units[0]).flatten().tolist()) == {2, 5}
    assert 6 in torch.nonzero(~units[1]).flatten().tolist()


def test_callback_keeps_removed_units_and_their_biases_at_zero_through_adam():
    module, trainer = TinyModule(total_updates=400), FakeTrainer()
    cb = PruningCallback("neuron", final_sparsity=0.6, burn_in=0.0, end=0.1, interval=5, allocation="layer")
    cb.setup(trainer, module)
    callback_steps(module, cb, trainer, 40)  # past t_end: final masks
    assert {"actor.mean_net.0.bias", "actor.mean_net.2.bias"} <= set(cb.masks)
    assert "actor.mean_net.4.bias" not in cb.masks  # output units are never removed
    masks = {n: m.clone() for n, m in cb.masks.items()}
    callback_steps(module, cb, trainer, 200)  # Adam's moments keep pushing
    for n, p in cb.params.items():
        assert torch.equal(cb.masks[n], masks[n])
        assert (p[~masks[n]] == 0).all(), n
    state = trainer.optimizers[0].state
    for p in module.actor.mean_net[0].bias, module.critic.value_net[2].bias:  # moments of removed biases
        name = next(n for n, q in cb.params.items() if q is p)
        assert (state[p]["exp_avg"][~cb.masks[name]] == 0).all()
    rep = cb.sparsity_report(module)
    assert rep["global"] == pytest.approx(0.6, abs=0.05)
    assert rep["units_removed"]["actor.mean_net.0"] > 0.3
    assert cb.checks == dict.fromkeys(CHECKS, 0)


def test_callback_removes_units_on_the_cubic_schedule_after_the_burn_in():
    # T = 400 updates, β = 0.25, end = 0.75, Δt = 10: nothing before t = 100, then mask updates at
    # t = 110, 120, …, 300, each to s_t = s_f(1 − (1 − (t − 100)/200)³) of each network's weights
    module, trainer = TinyModule(total_updates=400), FakeTrainer()
    cb = PruningCallback("neuron", final_sparsity=0.8, burn_in=0.25, end=0.75, interval=10, allocation="layer")
    cb.setup(trainer, module)
    seen = []
    cb.add_mask_listener(lambda tr, pl, event: seen.append((event.t, event.target)))
    callback_steps(module, cb, trainer, 100)
    assert not seen and not cb.masks  # burn-in: no unit touched
    assert all(bool((p != 0).all()) for n, p in cb.params.items() if n.endswith(".weight"))
    while trainer.global_step < 320:
        callback_steps(module, cb, trainer, 1)
        if seen and seen[-1][0] == trainer.global_step:
            t, target = seen[-1]
            assert target == pytest.approx(cubic_sparsity(t, 100, 300, 0.8))
            for names in cb.groups.values():  # the target counts weights, to within half a unit's
                ws = [cb.params[n] for n in names]
                zero = sum(int((w == 0).sum()) for w in ws)
                size = sum(w.numel() for w in ws)
                assert abs(zero - round(target * size)) <= unit_tolerance([tuple(w.shape) for w in ws]), t
    assert [t for t, _ in seen] == list(range(110, 301, 10))
    assert seen[-1][1] == pytest.approx(0.8)
    assert cb.checks == dict.fromkeys(CHECKS, 0)


def test_neuron_with_another_allocation_is_refused(small_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"pruning.allocation='erk' is not allowed with pruning.criterion='neuron'; "
                                          r"allowed: \['layer'\]"):
        fit(small_cfg("pruning=neuron", "pruning.allocation=erk"))
    assert not (tmp_path / "run").exists()


def test_real_fit_removes_whole_units_to_the_target_and_passes_the_checks(neuron_run):
    run, summary = neuron_run
    sp = summary["sparsity"]
    assert summary["pruning_method"] == "neuron" and summary["final_sparsity"] == 0.7
    tol = unit_tolerance([(64, 4), (64, 64), (1, 64)]) / (64 * 4 + 64 * 64 + 64)
    for key in ("global", "actor", "critic"):  # the actual fraction of zero weights
        assert sp[key] == pytest.approx(0.7, abs=tol), key
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for net in ("actor.mean_net", "critic.value_net"):
        w0, b0, w2, b2, w4 = (state[f"{net}.{k}"] for k in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight"))
        gone0 = (w0 == 0).all(1)
        gone2 = (w2 == 0).all(1)
        assert 0.3 < gone0.float().mean() < 0.6 and gone0.sum() == gone2.sum()  # evenly: 30 of 64 each
        assert (w2[:, gone0] == 0).all() and (b0[gone0] == 0).all()  # whole units: column and bias too
        assert (w4[:, gone2] == 0).all() and (b2[gone2] == 0).all()
        assert (w2[~gone2][:, ~gone0] != 0).all()  # what survives is dense
        assert sp["units_removed"][f"{net}.0"] == pytest.approx(float(gone0.float().mean()))
    lip = summary["lipschitz"]
    assert lip["mask_updates"] == summary["pruning"]["mask_updates"] == 3
    assert summary["pruning_checks"] == dict.fromkeys(CHECKS, 0) and lip["thm1_sanity_violations"] == 0
    assert summary["lipschitz_surrogate"] > 0 and summary["certified_bound"] > 0
    rows = [r for r in read_metrics(run) if "train/frames" in r]
    assert rows[-1]["prune/sparsity"] == pytest.approx(sp["global"])
    assert rows[-1]["prune/units_removed/actor.mean_net.0"] > 0.3
    thm3 = [r for r in read_metrics(run) if "lipschitz/thm3_pruning_loss" in r]
    # Thm. 3's terms, in the rows of rollouts with mask updates (the last update, at t_end, removes
    # no further unit here: its ‖Δθ‖ and pruning term are 0)
    assert thm3 and all(r["lipschitz/thm3_robustness_gap"] > 0 for r in thm3)
    assert thm3[0]["lipschitz/thm3_pruning_loss"] > 0 and thm3[0]["lipschitz/path_sensitivity"] > 0


def test_report_lists_neuron_beside_the_elementwise_methods(tmp_path, write_run):
    write = write_run
    attacks = {"mad": 50.0, "random": 80.0}
    for seed in (0, 1):
        write(tmp_path, f"dense_s{seed}", method="none", sparsity=0.0, seed=seed, clean=100.0, attacks=attacks)
        for method in ("magnitude", "neuron"):
            for s in (0.5, 0.9):
                write(tmp_path, f"{method}{s}_s{seed}", method=method, sparsity=s, seed=seed, clean=90.0 - 10 * s,
                      attacks={"mad": 60.0, "random": 70.0})
    result = report(tmp_path, tmp_path / "report", resamples=0)
    assert {v["method"] for v in result["verdicts"]} == {"magnitude", "neuron"}
    table = (tmp_path / "report" / "table2_sweet_spots.md").read_text()
    assert "neuron" in table and "magnitude" in table


def test_a_resumed_neuron_run_continues_bit_for_bit(small_cfg, tmp_path):
    # 3 rollouts of 16 updates; mask updates at t = 19, 26, 33, 36; resumed after t = 32
    common = ["total_frames=3072", "pruning=neuron", "pruning.final_sparsity=0.7", "pruning.interval=7",
              "algo.kappa=0", "checkpoint.every_n_rollouts=1", "++callbacks.evaluation=null"]
    fit(small_cfg(*common, run_dir=tmp_path / "full"))
    mid = sorted((tmp_path / "full" / "checkpoints").glob("rollout*.ckpt"))[1]
    masks = torch.load(mid, weights_only=False)["callbacks"]["PruningCallback"]["masks"]
    assert "actor.mean_net.2.bias" in masks and not masks["actor.mean_net.2.bias"].all()  # bias masks travel
    summary = fit(small_cfg(*common, f"resume={mid}", "seed=3", run_dir=tmp_path / "resumed"))
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert summary["pruning"]["mask_updates"] == 4 and summary["pruning_checks"] == dict.fromkeys(CHECKS, 0)
