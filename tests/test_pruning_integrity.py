"""A pruned network trains exactly like a dense network of its surviving weights (gradients masked
before the clip, Adam's moments of pruned entries zeroed), and the integrity checks count what
they are meant to: each fault is injected and seen counted (issue 9, items 2 and 3).

The training-equivalence tests run the real PPOModule (its loss, manual_backward, global
grad-norm clip and fused Adam over the flat buffer) in a real Lightning Trainer on fixed batches.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

import callbacks.pruning as pruning_cb
from callbacks.lipschitz import LipschitzCallback
from callbacks.pruning import CHECKS, MaskUpdate, PruningCallback
from prunerl.fit import fit
from tests.conftest import FakeTrainer, TinyModule, callback_steps
from prunerl.models import Critic, GaussianActor
from prunerl.module import PPOModule
from prunerl.rundir import read_metrics

OBS, ACT, HIDDEN, BATCH = 5, 2, (16, 16), 64
STEPS = 5  # t = 1 is dense; the one-shot mask update comes right after it; t = 2..5 are sparse
MAX_GRAD_NORM = 0.05  # small enough that the clip scales every update


def _batches(n: int) -> list[TensorDict]:
    g = torch.Generator().manual_seed(0)
    return [TensorDict({"observation": torch.randn(BATCH, OBS, generator=g),
                        "action": torch.randn(BATCH, ACT, generator=g),
                        "sample_log_prob": -2.0 + 0.1 * torch.randn(BATCH, generator=g),
                        "advantage": torch.randn(BATCH, generator=g),
                        "value_target": torch.randn(BATCH, generator=g)}, batch_size=[BATCH])
            for _ in range(n)]


def _module(actor, critic, total_updates: int) -> PPOModule:
    # κ > 0 (the SA loop differentiates through the network too); constant ε so that the
    # reference run, which starts at t = 0, sees the same ε at the same batch
    return PPOModule(actor, critic, total_updates=total_updates, lr=1e-2, max_grad_norm=MAX_GRAD_NORM,
                     kappa=0.3, eps=0.1, sa_steps=3, eps_ramp=0.0)


class Batches:
    """One epoch of fixed minibatches (an iterable, as ``prunerl.data.Rollout`` is; a list would
    be read as several dataloaders)."""

    def __init__(self, batches: list[TensorDict]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _fit(module, batches, callbacks) -> None:
    trainer = L.Trainer(max_steps=len(batches), max_epochs=1, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(module, train_dataloaders=Batches(batches))


class Record(L.Callback):
    """After each update (and after the pruning callback, listed before it): the flat parameters,
    their Adam state, the clip norm, the clipped gradient the step used, the torch RNG state."""

    def __init__(self):
        self.steps: list[dict] = []
        self._grad = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._grad = pl_module.flat.param.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        st = trainer.optimizers[0].state[pl_module.flat.param]
        self.steps.append({"t": trainer.global_step, "param": pl_module.flat.param.detach().clone(),
                           "grad": self._grad, "grad_norm": float(pl_module.grad_norm),
                           "exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone(),
                           "step": st["step"].clone(), "rng": torch.get_rng_state(),
                           "modules": {k: v.clone() for k, v in pl_module.state_dict().items()}})


class StartFrom(L.Callback):
    """Start the reference run from a recorded optimiser state and torch RNG state."""

    def __init__(self, state: dict):
        self.state = state

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].state[pl_module.flat.param] = {k: self.state[k].clone() for k in ("step", "exp_avg", "exp_avg_sq")}
        torch.set_rng_state(self.state["rng"])


class SurvivingLinear(nn.Module):
    """A Linear layer whose weight parameters are only its surviving entries: W = scatter(mask, v)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.values = nn.Parameter(weight.detach()[mask].clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.register_buffer("mask", mask.clone())

    def forward(self, x):
        w = torch.zeros(self.mask.shape, dtype=self.values.dtype).masked_scatter(self.mask, self.values)
        return F.linear(x, w, self.bias)


def _nets():
    torch.manual_seed(0)
    return GaussianActor(OBS, ACT, HIDDEN, learn_std=True), Critic(OBS, HIDDEN)


def _pruned_run(criterion: str, extra_callbacks=()):
    actor, critic = _nets()
    module = _module(actor, critic, STEPS)
    cb = PruningCallback(criterion, final_sparsity=0.7, burn_in=0.0, interval=0)  # one-shot at t = 1
    rec = Record()
    _fit(module, _batches(STEPS), [cb, *extra_callbacks, rec])
    return module, cb, rec


def _keep_flat(module: PPOModule, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The flat buffer's entries that survive, in its order ([*actor params, *critic params])."""
    parts = [masks.get(f"{prefix}.{n}", torch.ones_like(p, dtype=torch.bool)).reshape(-1)
             for prefix, net in (("actor", module.actor), ("critic", module.critic))
             for n, p in net.named_parameters()]
    return torch.cat(parts)


def test_a_pruned_network_trains_exactly_like_a_dense_network_of_its_surviving_weights():
    module, cb, rec = _pruned_run("magnitude")
    keep = _keep_flat(module, cb.masks)
    assert 0.6 < 1 - float(keep.float().mean()) < 0.7  # ~70% of the weights (biases, log σ kept)
    start = rec.steps[0]  # after t = 1 and the mask update
    assert start["t"] == 1 and cb.mask_updates == 1

    # the reference: the same networks with only the surviving weights as parameters
    actor, critic = _nets()
    actor.load_state_dict({k.removeprefix("actor."): v for k, v in start["modules"].items() if k.startswith("actor.")})
    critic.load_state_dict({k.removeprefix("critic."): v for k, v in start["modules"].items() if k.startswith("critic.")})
    for prefix, seq in (("actor.mean_net", actor.mean_net), ("critic.value_net", critic.value_net)):
        for i, m in enumerate(seq):
            if isinstance(m, nn.Linear):
                seq[i] = SurvivingLinear(m.weight, m.bias, cb.masks[f"{prefix}.{i}.weight"].cpu())
    # the same surviving values, in the same order as the pruned run's flat buffer
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in [*actor.parameters(), *critic.parameters()]]),
                       start["param"][keep])
    ref = _module(actor, critic, STEPS - 1)
    ref_rec = Record()
    state = {k: start[k][keep] if k.startswith("exp_avg") else start[k] for k in ("step", "exp_avg", "exp_avg_sq")}
    _fit(ref, _batches(STEPS)[1:], [StartFrom({**state, "rng": start["rng"]}), ref_rec])

    # after each of the sparse updates: the same surviving weights, the same clip norm
    for a, b in zip(rec.steps[1:], ref_rec.steps, strict=True):
        assert a["t"] == b["t"] + 1
        assert a["grad_norm"] > MAX_GRAD_NORM  # the clip scales this update...
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)  # ...by the sparse network's norm
        assert torch.allclose(a["param"][keep], b["param"], rtol=1e-5, atol=1e-7)
        assert (a["param"][~keep] == 0).all()
        # pruned entries: no gradient, no Adam moments — the step cannot move them
        assert (a["grad"][~keep] == 0).all()
        assert (a["exp_avg"][~keep] == 0).all() and (a["exp_avg_sq"][~keep] == 0).all()
    moved = rec.steps[-1]["param"][keep] - start["param"][keep]
    assert moved.abs().max() > 1e-3  # the survivors did train
    assert cb.checks == dict.fromkeys(CHECKS, 0)


def test_magnitude_ste_trains_its_dense_copy_with_the_dense_gradient():
    module, cb, rec = _pruned_run("magnitude_ste")
    keep = _keep_flat(module, cb.masks)
    for step in rec.steps[1:]:
        # the gradient of the pruned entries flows (straight-through) into the dense copy's step...
        assert (step["grad"][~keep] != 0).float().mean() > 0.9
        # ...while the module holds W⊙M between steps
        assert (step["param"][~keep] == 0).all()
    dense = torch.cat([cb.dense[n].reshape(-1) for n in cb.params])
    masks = torch.cat([cb.masks[n].reshape(-1) for n in cb.params])
    assert (dense[~masks] != 0).all()
    assert cb.checks == dict.fromkeys(CHECKS, 0)


class RawGradients(L.Callback):
    """Listed before the pruning callback: each update's weights and raw gradients (before the
    pruning callback masks them and before the module clips them)."""

    def __init__(self):
        self.at: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def on_after_backward(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, PruningCallback))
        self.at[trainer.global_step + 1] = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in cb.params.items()}


class SaliencySums(L.Callback):
    def __init__(self):
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cb = next(c for c in trainer.callbacks if isinstance(c, PruningCallback))
        self.at[trainer.global_step] = {n: s.clone() for n, s in cb.saliency_sum.items()}


def test_saliency_scores_use_the_raw_gradient_before_masking_and_clipping():
    actor, critic = _nets()
    module = _module(actor, critic, STEPS)
    raw, sums = RawGradients(), SaliencySums()
    cb = PruningCallback("saliency", final_sparsity=0.7, burn_in=0.0, interval=2)  # mask updates at t = 2, 4
    _fit(module, _batches(STEPS), [raw, cb, sums])
    assert cb.mask_updates == 2
    for t in (1, 3):  # the first update of each saliency window (the sums restart after a mask update)
        assert set(sums.at[t]) == set(cb.params)
        for n, (w, g) in raw.at[t].items():
            assert torch.equal(sums.at[t][n], (w * g).abs()), (t, n)
    # the clip did scale those gradients (so clipped ones would rank differently over a window)
    assert all(float(torch.cat([g.reshape(-1) for _, g in raw.at[t].values()]).norm()) > MAX_GRAD_NORM for t in (1, 3))


class LeakGradient(L.Callback):
    """Fault: something adds to the gradient after the pruning callback masked it."""

    def on_after_backward(self, trainer, pl_module):
        pl_module.flat.param.grad.add_(1e-3)


def test_a_step_that_moves_pruned_weights_is_counted_and_undone():
    module, cb, rec = _pruned_run("magnitude", [LeakGradient()])
    pruned = sum(int((~m).sum()) for m in cb.masks.values())
    # every sparse update (t = 2..5) moved the pruned weights: each such step counted, then masked again
    assert pruned > 0 and cb.checks["pruned_nonzero_after_step"] == STEPS - 1
    assert all((s["param"][~_keep_flat(module, cb.masks)] == 0).all() for s in rec.steps)
    assert cb.checks["pruned_nonzero_at_rollout_end"] == 0


class PokeAtLastUpdate(L.Callback):
    """Fault: a pruned weight of the module is non-zero when the rollout ends (e.g. the STE's
    re-masking after the step did not happen)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == STEPS:
            cb = next(c for c in trainer.callbacks if isinstance(c, PruningCallback))
            name = "actor.mean_net.2.weight"
            idx = tuple((~cb.masks[name]).nonzero()[0].tolist())
            with torch.no_grad():
                pl_module.get_parameter(name)[idx] = 0.5


@pytest.mark.parametrize("criterion", ["magnitude", "magnitude_ste"])
def test_a_pruned_weight_nonzero_at_the_end_of_a_rollout_is_counted(criterion):
    _, cb, _ = _pruned_run(criterion, [PokeAtLastUpdate()])
    assert cb.checks["pruned_nonzero_at_rollout_end"] == 1
    assert cb.checks["pruned_nonzero_after_step"] == 0


# -- mask updates --------------------------------------------------------------------------------
def _faulty(fault):
    real = pruning_cb.compute_masks

    def compute_masks(scores, sparsity, allocation, previous=None):
        out = {n: m.clone() for n, m in real(scores, sparsity, allocation, previous).items()}
        name = max(out, key=lambda n: int((~out[n]).sum()))  # the most pruned layer
        flat = out[name].view(-1)
        if fault == "regrow" and previous is not None:  # a pruned weight comes back, a kept one goes
            flat[int((~previous[name]).view(-1).nonzero()[0])] = True
            flat[int(flat.nonzero()[-1])] = False
        if fault == "overprune":  # one more than scheduled
            flat[int(flat.nonzero()[-1])] = False
        return out

    return compute_masks


@pytest.mark.parametrize("fault, check", [("regrow", "mask_regrown_entries"), ("overprune", "mask_count_off_entries")])
def test_a_mask_update_that_loses_entries_it_should_keep_is_counted(monkeypatch, fault, check):
    monkeypatch.setattr(pruning_cb, "compute_masks", _faulty(fault))
    module, trainer = TinyModule(total_updates=400), FakeTrainer()
    cb = PruningCallback("magnitude", final_sparsity=0.6, burn_in=0.0, end=0.1, interval=5)
    cb.setup(trainer, module)
    callback_steps(module, cb, trainer, 40)  # mask updates at t = 5, 10, ..., 40: 8 of them, 2 networks each
    assert cb.mask_updates == 8
    if fault == "regrow":  # each update after the first (which has no previous mask), each network
        assert cb.checks[check] == 7 * 2
    else:  # each update, each network; an extra entry is kept pruned where the target barely rose
        assert cb.checks[check] >= 8 * 2
    assert sum(cb.checks.values()) == cb.checks[check]  # nothing else counted


def test_magnitude_ste_regrowth_is_not_a_fault():
    module, trainer = TinyModule(total_updates=1000), FakeTrainer()
    cb = PruningCallback("magnitude_ste", final_sparsity=0.5, burn_in=0.0, end=0.5, interval=10)
    cb.setup(trainer, module)
    callback_steps(module, cb, trainer, 10)
    name = "actor.mean_net.2.weight"
    i = tuple((~cb.masks[name]).nonzero()[0].tolist())
    cb.dense[name][i] = 100.0  # as if straight-through gradients had grown it
    callback_steps(module, cb, trainer, 10)
    assert cb.masks[name][i] and cb.regrown >= 1
    assert cb.checks == dict.fromkeys(CHECKS, 0)


def test_a_trainer_that_skips_the_gradient_masking_hook_is_caught():
    # a loop that never calls on_after_backward: Adam moves the pruned weights at every step
    module, trainer = TinyModule(total_updates=400), FakeTrainer()
    cb = PruningCallback("magnitude", final_sparsity=0.6, burn_in=0.0, end=0.1, interval=5)
    cb.setup(trainer, module)
    callback_steps(module, cb, trainer, 5)
    cb.on_after_backward = lambda *a: None
    callback_steps(module, cb, trainer, 3)
    cb.on_train_epoch_end(trainer, module)
    assert cb.checks["pruned_nonzero_after_step"] > 0
    assert cb.checks["pruned_nonzero_at_rollout_end"] == 0  # reapplied after every step


# -- Lipschitz: Thm. 1's sanity check and L̃ growth between mask updates ------------------------
def _with_lipschitz(module, trainer, interval=5):
    cb = PruningCallback("magnitude", final_sparsity=0.6, burn_in=0.0, end=0.2, interval=interval)
    lip = LipschitzCallback(eps=0.1, gamma=0.99, r_max=1.0)
    cb.setup(trainer, module)
    cb.add_mask_listener(lip.on_mask_update)
    return cb, lip


def test_surrogate_growth_between_mask_updates_is_a_figure_not_a_violation():
    module, trainer = TinyModule(total_updates=400), FakeTrainer()
    cb, lip = _with_lipschitz(module, trainer)
    callback_steps(module, cb, trainer, 5)  # first mask update
    assert "lipschitz/surrogate_growth_since_mask_update_actor" not in lip.last_update
    after = lip.last_update["lipschitz/surrogate_actor_after"]
    with torch.no_grad():  # training that doubles every actor weight matrix: L̃ × 2³
        for m in module.actor.mean_net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(2)
    callback_steps(module, cb, trainer, 5, lr=0.0)  # next mask update at t = 10, no training in between
    row = lip.last_update
    assert row["lipschitz/surrogate_growth_since_mask_update_actor"] == pytest.approx(8.0, rel=1e-6)
    assert row["lipschitz/surrogate_actor_before"] == pytest.approx(8 * after, rel=1e-6)
    assert row["lipschitz/surrogate_growth_since_mask_update_critic"] == pytest.approx(1.0, rel=1e-6)
    assert lip.thm1_violations == 0
    assert lip.log_change["actor"]["training"] == pytest.approx(3 * 0.6931471805599453, rel=1e-6)


def test_thm1_sanity_check_counts_weights_that_are_not_a_pruning_of_before():
    module, trainer = TinyModule(total_updates=400), FakeTrainer()
    cb, lip = _with_lipschitz(module, trainer)
    callback_steps(module, cb, trainer, 5)
    assert lip.thm1_violations == 0
    # fault: the weights after a "mask update" are larger than what the masks were applied to
    before = {n: p.detach() * 0.5 for n, p in cb.params.items()}
    lip.on_mask_update(trainer, module, MaskUpdate(t=5, target=cb.target, before=before, regrown=0))
    assert lip.thm1_violations == 1
    assert lip.last_update["lipschitz/thm1_sanity_violations"] == 1.0


# -- resume ----------------------------------------------------------------------------------------
def test_resume_counts_and_clears_nonzero_pruned_weights_and_their_adam_moments(small_cfg, tmp_path):
    common = ["total_frames=3072", "pruning.final_sparsity=0.7", "pruning.interval=0", "algo.kappa=0",
              "checkpoint.every_n_rollouts=1", "++callbacks.evaluation=null"]
    fit(small_cfg(*common, run_dir=tmp_path / "full"))  # one-shot mask update at t = 13
    ckpt = sorted((tmp_path / "full" / "checkpoints").glob("rollout*.ckpt"))[1]  # after t = 32
    state = torch.load(ckpt, weights_only=False)
    masks = state["callbacks"]["PruningCallback"]["masks"]
    name = "actor.mean_net.2.weight"
    pruned = (~masks[name]).nonzero()[:5]
    # the flat buffer's offset of `name`: parameters in the module's order, actor then critic
    from prunerl.fit import build_models
    actor, critic = build_models(small_cfg(*common), 4, 1)
    names = [f"actor.{n}" for n, _ in actor.named_parameters()] + [f"critic.{n}" for n, _ in critic.named_parameters()]
    sizes = dict([(f"actor.{n}", p.numel()) for n, p in actor.named_parameters()]
                 + [(f"critic.{n}", p.numel()) for n, p in critic.named_parameters()])
    offset = sum(sizes[n] for n in names[:names.index(name)])
    adam = state["optimizer_states"][0]["state"][0]
    cols = masks[name].shape[1]
    for i, j in pruned.tolist():
        state["state_dict"][name][i, j] = 0.25  # a checkpoint whose pruned weights are not zero...
        adam["exp_avg"][offset + i * cols + j] = 1.0  # ...and whose Adam moments still push them
        adam["exp_avg_sq"][offset + i * cols + j] = 1.0
    injected = tmp_path / "injected.ckpt"
    torch.save(state, injected)
    summary = fit(small_cfg(*common, f"resume={injected}", run_dir=tmp_path / "resumed"))
    checks = summary["pruning_checks"]
    assert checks["pruned_nonzero_on_resume"] == 5
    assert checks["pruned_nonzero_after_step"] == 0  # the moments were zeroed on resume
    # repaired: the resumed run ends exactly where the unsplit run does
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    rows = [r for r in read_metrics(tmp_path / "resumed") if "train/frames" in r]
    assert rows[-1]["prune/checks/pruned_nonzero_on_resume"] == 5


# -- a real micro-pruning run ----------------------------------------------------------------------
def test_real_micro_pruning_run_prunes_the_scheduled_count_and_logs_the_surrogates_growth(small_cfg, tmp_path):
    # interval 1 to 90% with per-layer allocation: the per-layer rounding dips here (it pruned 4
    # entries more than scheduled before nested masks honoured the exact total)
    summary = fit(small_cfg("total_frames=8192", "pruning.final_sparsity=0.9", "pruning.interval=1",
                            "pruning.allocation=layer", "algo.kappa=0", "++callbacks.evaluation=null"))
    assert summary["pruning_checks"] == dict.fromkeys(CHECKS, 0)
    lip = summary["lipschitz"]
    assert lip["thm1_sanity_violations"] == 0 and lip["mask_updates"] == summary["pruning"]["mask_updates"] > 50
    rows = [r for r in read_metrics(tmp_path / "run") if "lipschitz/surrogate_actor_after" in r]
    assert rows and all(r["lipschitz/surrogate_growth_since_mask_update_actor"] > 0 for r in rows)
    # log L̃ over the pruning phase = Σ training growth between mask updates + Σ drops at them
    change = lip["surrogate_log_change"]["actor"]
    assert change["pruning"] < 0
    end = lip["last_mask_update"]["surrogate_actor_after"]
    assert change["training"] + change["pruning"] == pytest.approx(
        math.log(end / lip["surrogate_at_pruning_start"]["actor"]), abs=1e-9)
