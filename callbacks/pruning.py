"""Pruning while PPO(+SA) trains (Sec. 4.4, Alg. 1 lines 9–11), as a Lightning callback.

After every optimiser step (``on_train_batch_end``, t = ``trainer.global_step``):
1. the masks are reapplied, so pruned weights are exactly zero again whatever Adam's moments did;
2. if t is a mask update of the schedule (cubic from 0 to ``final_sparsity`` between
   t_start = ⌊burn_in·T⌋ and t_end = ⌈end·T⌉, every ``interval`` updates; ``interval=0``:
   one-shot), new masks are computed from the criterion's scores and applied, and listeners
   (the Lipschitz callback) are told, with the weights as they were just before.

Magnitude-STE keeps dense weights here: the module always holds W⊙M (forward, rollouts,
checkpoints' ``state_dict``, evaluation), the gradient of the masked weights is applied to the
dense ones (straight-through: the dense weights are swapped in just before ``opt.step()`` and
masked again right after), and the next mask update ranks the dense weights, so a pruned weight
can come back. Masks, dense weights, saliency sums and counters are callback state: they travel
in checkpoints and a resumed run continues the schedule where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from prunerl.pruning import (ALLOCATIONS, CRITERIA, SCOPES, compute_masks, is_mask_update,
                             magnitude_scores, random_scores, saliency_scores, schedule_bounds,
                             scheduled_sparsity, sparsity_of)

NETWORKS = {"actor": "actor.mean_net", "critic": "critic.value_net"}


@dataclass
class MaskUpdate:
    """What a listener is told after the mask update at update t."""

    t: int
    target: float                      # the schedule's sparsity for this update
    before: dict[str, torch.Tensor]    # the weights the new masks were applied to (STE: dense)
    regrown: int                       # weights unpruned by this update (magnitude-STE only)


def validate_pruning(criterion: str, final_sparsity: float, burn_in: float, end: float, interval: int,
                     allocation: str, scope: str) -> None:
    """ValueError naming the bad ``pruning.*`` value and what is allowed."""
    if criterion not in CRITERIA:
        raise ValueError(f"pruning.criterion={criterion!r} is not allowed; allowed: {list(CRITERIA)}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"pruning.allocation={allocation!r} is not allowed; allowed: {list(ALLOCATIONS)}")
    if scope not in SCOPES:
        raise ValueError(f"pruning.scope={scope!r} is not allowed; allowed: {list(SCOPES)}")
    if not 0.0 <= final_sparsity < 1.0:
        raise ValueError(f"pruning.final_sparsity={final_sparsity} is outside [0, 1)")
    if not 0.0 <= burn_in < 1.0:
        raise ValueError(f"pruning.burn_in={burn_in} is outside [0, 1)")
    if not burn_in < end <= 1.0:
        raise ValueError(f"pruning.end={end} is outside (pruning.burn_in={burn_in}, 1]")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 0:
        raise ValueError(f"pruning.interval={interval!r} must be an integer >= 0 (0: one-shot)")


class PruningCallback(L.Callback):
    def __init__(self, criterion: str = "magnitude", final_sparsity: float = 0.5, burn_in: float = 0.25,
                 end: float = 0.75, interval: int = 15, allocation: str = "erk", scope: str = "both",
                 seed: int = 0):
        validate_pruning(criterion, final_sparsity, burn_in, end, interval, allocation, scope)
        self.criterion, self.final_sparsity = criterion, float(final_sparsity)
        self.burn_in, self.end, self.interval = burn_in, end, interval
        self.allocation, self.scope, self.seed = allocation, scope, seed
        self.listeners: list = []
        self.params: dict[str, nn.Parameter] = {}   # pruned weight matrices by state_dict name
        self.groups: dict[str, list[str]] = {}      # network -> its pruned names (each meets the target)
        self.masks: dict[str, torch.Tensor] = {}
        self.dense: dict[str, torch.Tensor] = {}    # magnitude-STE's dense weights
        self.saliency_sum: dict[str, torch.Tensor] = {}
        self.saliency_count = 0
        self.mask_updates = 0
        self.target = 0.0
        self.regrown = 0
        self.t_start = self.t_end = 0
        self._random: dict[str, torch.Tensor] | None = None
        self._mult: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.criterion != "none"

    def add_mask_listener(self, fn) -> None:
        """``fn(trainer, pl_module, MaskUpdate)`` runs right after each mask update is applied."""
        if fn not in self.listeners:
            self.listeners.append(fn)

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage=None):
        nets = ("actor", "critic") if self.scope == "both" else (self.scope,)
        named = dict(pl_module.named_parameters())
        self.params, self.groups = {}, {}
        for net in nets:
            prefix = NETWORKS[net]
            seq = pl_module.get_submodule(prefix)
            names = [f"{prefix}.{i}.weight" for i, m in enumerate(seq) if isinstance(m, nn.Linear)]
            self.groups[net] = names
            self.params.update({n: named[n] for n in names})
        self.t_start, self.t_end = schedule_bounds(pl_module.total_updates, self.burn_in, self.end)

    def on_train_start(self, trainer, pl_module):
        # after a resume: state loaded from the checkpoint -> onto the weights' device, re-applied
        for store in (self.masks, self.dense, self.saliency_sum):
            for n in store:
                store[n] = store[n].to(self.params[n].device)
        self._mult = {}
        self._apply_masks()

    # -- the training loop -------------------------------------------------------------------
    def _saliency_window(self, t: int) -> bool:
        """Saliency scores average the updates since the previous mask update (or the last
        ``interval`` updates before the first one)."""
        window = self.interval or 15
        last = self.t_start + 1 if self.interval == 0 else self.t_end
        return self.t_start - window < t <= last

    def on_after_backward(self, trainer, pl_module):
        # raw ∂L/∂w of this update (before clipping); weights are the masked ones
        t = trainer.global_step + 1
        if self.criterion != "saliency" or not self._saliency_window(t):
            return
        with torch.no_grad():
            for n, p in self.params.items():
                if p.grad is None:
                    continue
                s = (p * p.grad).abs()
                if n in self.saliency_sum:
                    self.saliency_sum[n].add_(s)
                else:
                    self.saliency_sum[n] = s
        self.saliency_count += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # STE: the step updates the dense weights with the gradient taken at the masked ones
        if self.dense:
            with torch.no_grad():
                for n, d in self.dense.items():
                    self.params[n].copy_(d)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.active:
            return
        if self.dense:
            with torch.no_grad():
                for n, d in self.dense.items():
                    d.copy_(self.params[n])
        self._apply_masks()
        t = trainer.global_step
        if is_mask_update(t, self.t_start, self.t_end, self.interval):
            self._update_masks(trainer, pl_module, t)

    @torch.no_grad()
    def _apply_masks(self) -> None:
        if len(self._mult) != len(self.masks):  # float copies: ~3× cheaper to multiply by than bools
            self._mult = {n: m.to(self.params[n].dtype) for n, m in self.masks.items()}
        if self._mult:
            torch._foreach_mul_([self.params[n] for n in self._mult], list(self._mult.values()))

    @torch.no_grad()
    def _update_masks(self, trainer, pl_module, t: int) -> None:
        target = scheduled_sparsity(t, self.t_start, self.t_end, self.final_sparsity, self.interval)
        before = {n: (self.dense[n] if n in self.dense else p).detach().clone() for n, p in self.params.items()}
        scores = self._scores(before)
        ste = self.criterion == "magnitude_ste"
        new: dict[str, torch.Tensor] = {}
        for names in self.groups.values():
            previous = None if ste or not self.masks else {n: self.masks[n] for n in names}
            new.update(compute_masks({n: scores[n] for n in names}, target, self.allocation, previous))
        self.regrown = sum(int((m & ~self.masks[n]).sum()) for n, m in new.items()) if self.masks else 0
        if ste and not self.dense:
            self.dense = {n: b.clone() for n, b in before.items()}
        self.masks, self._mult = new, {}
        for n, p in self.params.items():
            p.copy_(before[n] * new[n])
        self.target = target
        self.mask_updates += 1
        self.saliency_sum, self.saliency_count = {}, 0
        event = MaskUpdate(t=t, target=target, before=before, regrown=self.regrown)
        for fn in self.listeners:
            fn(trainer, pl_module, event)

    def _scores(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.criterion == "random":
            if self._random is None:  # fixed for the whole run (drawn from the run's seed)
                scores = random_scores({n: w.shape for n, w in weights.items()}, self.seed)
                self._random = {n: s.to(weights[n].device) for n, s in scores.items()}
            return self._random
        if self.criterion == "saliency" and self.saliency_count:
            mean = {n: s / self.saliency_count for n, s in self.saliency_sum.items()}
            # |w·g| averaged over the recent updates (the sums already hold |w·g| per update)
            return {n: mean.get(n, torch.zeros_like(w)) for n, w in weights.items()}
        return magnitude_scores(weights)  # magnitude, magnitude-STE (and saliency with no grads yet)

    # -- logs and summary --------------------------------------------------------------------
    def sparsity_report(self, pl_module) -> dict:
        """Actual sparsity (exact zeros) of the Linear weights: global, actor, critic, per layer."""
        layers: dict[str, float] = {}
        zeros = {"actor": 0, "critic": 0}
        sizes = {"actor": 0, "critic": 0}
        for net, prefix in NETWORKS.items():
            for i, m in enumerate(pl_module.get_submodule(prefix)):
                if isinstance(m, nn.Linear):
                    z = int((m.weight == 0).sum())
                    layers[f"{prefix}.{i}"] = z / m.weight.numel()
                    zeros[net] += z
                    sizes[net] += m.weight.numel()
        return {
            "global": sum(zeros.values()) / sum(sizes.values()),
            "actor": zeros["actor"] / sizes["actor"],
            "critic": zeros["critic"] / sizes["critic"],
            "target": self.target,
            "masks": sparsity_of(self.masks) if self.masks else 0.0,
            "layers": layers,
        }

    def on_train_epoch_end(self, trainer, pl_module):
        rows = getattr(pl_module, "rollout_metrics", None)
        if rows is None or not self.active:
            return
        rep = self.sparsity_report(pl_module)
        rows.update({"prune/target_sparsity": rep["target"], "prune/sparsity": rep["global"],
                     "prune/sparsity_actor": rep["actor"], "prune/sparsity_critic": rep["critic"],
                     "prune/mask_updates": float(self.mask_updates)})
        rows.update({f"prune/sparsity/{k}": v for k, v in rep["layers"].items()})
        if self.criterion == "magnitude_ste":
            rows["prune/regrown"] = float(self.regrown)

    def summary(self, trainer, pl_module) -> dict:
        rep = self.sparsity_report(pl_module)
        return {
            "pruning_method": self.criterion,
            "final_sparsity": self.final_sparsity if self.active else 0.0,
            "sparsity": rep,
            "pruning": {"criterion": self.criterion, "allocation": self.allocation, "scope": self.scope,
                        "burn_in": self.burn_in, "end": self.end, "interval": self.interval,
                        "t_start": self.t_start, "t_end": self.t_end, "mask_updates": self.mask_updates},
        }

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "masks": {n: m.cpu() for n, m in self.masks.items()},
            "dense": {n: d.cpu() for n, d in self.dense.items()},
            "saliency_sum": {n: s.cpu() for n, s in self.saliency_sum.items()},
            "saliency_count": self.saliency_count,
            "mask_updates": self.mask_updates,
            "target": self.target,
            "regrown": self.regrown,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["criterion"] != self.criterion:
            raise ValueError(f"the checkpoint was pruned with pruning.criterion={state['criterion']!r}, "
                             f"this run has {self.criterion!r}")
        self.masks, self._mult = dict(state["masks"]), {}
        self.dense = dict(state["dense"])
        self.saliency_sum = dict(state["saliency_sum"])
        self.saliency_count = state["saliency_count"]
        self.mask_updates, self.target, self.regrown = state["mask_updates"], state["target"], state["regrown"]
        self.seed = state["seed"]  # random scores are drawn from the seed the run started with
