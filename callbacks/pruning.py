"""Pruning while PPO(+SA) trains (Sec. 4.4, Alg. 1 lines 9–11), as a Lightning callback.

A pruned network trains exactly like a dense network of its surviving weights:
1. after each backward (``on_after_backward``, which Lightning runs inside ``manual_backward``,
   before the module clips the global gradient norm) the gradients of pruned entries are zeroed,
   so they neither enter the clip norm nor Adam's moments;
2. at each mask update and on resume, Adam's moments (``exp_avg``, ``exp_avg_sq``) of pruned
   entries are zeroed, so an optimiser step leaves a pruned weight exactly at zero;
3. after every optimiser step (``on_train_batch_end``, t = ``trainer.global_step``) the masks are
   reapplied anyway, after counting any pruned weight the step left non-zero (a fault);
4. if t is a mask update of the schedule (cubic from 0 to ``final_sparsity`` between
   t_start = ⌊burn_in·T⌋ and t_end = ⌈end·T⌉, every ``interval`` updates; ``interval=0``:
   one-shot), new masks are computed from the criterion's scores and applied, and listeners
   (the Lipschitz callback) are told, with the weights as they were just before.

Neuron pruning (``criterion="neuron"``, structured) removes whole hidden units on the same
schedule: its masks cover the weight matrices *and* the hidden layers' biases (a removed unit's
row, bias entry and outgoing column are zeroed; ``prunerl.pruning.neuron_masks``), and everything
below — gradients, Adam's moments, reapplying after each step, the checks — treats those bias
masks exactly like the weight masks. The target still counts weights.

Magnitude-STE keeps dense weights here: the module always holds W⊙M (forward, rollouts,
checkpoints' ``state_dict``, evaluation), the gradient of the masked weights is applied to the
dense ones (straight-through: the dense gradient is not masked, the dense weights are swapped in
just before ``opt.step()`` and masked again right after), and the next mask update ranks the
dense weights, so a pruned weight can come back. Masks, dense weights, saliency sums and counters
are callback state: they travel in checkpoints and a resumed run continues the schedule where it
stopped.

Integrity checks (``checks``; cumulative counts of faults, each 0 in a correct run; logged as
``prune/checks/<name>`` and in ``summary.json`` under ``pruning_checks``):
- ``pruned_nonzero_after_step``: optimiser steps after which a pruned weight entry was non-zero
  (not magnitude-STE, whose step moves the dense copy by design); a step's check is two fused
  ops (~40 µs for 2×256 networks), no device sync;
- ``pruned_nonzero_at_rollout_end``: pruned entries non-zero in the module's weights at the end
  of a rollout, when the collector is about to use them (every criterion, magnitude-STE too);
- ``pruned_nonzero_on_resume``: pruned entries non-zero in the weights a resumed run loaded;
- ``mask_regrown_entries``: entries a mask update un-pruned (not magnitude-STE: masks must be
  nested, a pruned weight never comes back);
- ``mask_count_off_entries``: Σ over mask updates and networks of |weights pruned −
  round(target · weights)|: each update must prune exactly the scheduled number. Neuron pruning
  removes whole units, so it may miss by up to half of one unit's weights
  (``prunerl.pruning.unit_tolerance``); only what lies beyond that is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from prunerl.pruning import (ALLOCATIONS, CRITERIA, SCOPES, STRUCTURED, compute_masks, is_mask_update,
                             magnitude_scores, neuron_masks, random_scores, saliency_scores,
                             schedule_bounds, scheduled_sparsity, sparsity_of, unit_tolerance)

NETWORKS = {"actor": "actor.mean_net", "critic": "critic.value_net"}
CHECKS = ("pruned_nonzero_after_step", "pruned_nonzero_at_rollout_end", "pruned_nonzero_on_resume",
          "mask_regrown_entries", "mask_count_off_entries")


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
    if criterion in STRUCTURED and allocation != "layer":
        raise ValueError(f"pruning.allocation={allocation!r} is not allowed with pruning.criterion={criterion!r}; "
                         "allowed: ['layer'] (units are removed evenly across the hidden layers)")
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
        self.params: dict[str, nn.Parameter] = {}   # masked tensors by state_dict name (weights; neuron: + hidden biases)
        self.groups: dict[str, list[str]] = {}      # network -> its pruned weight names (each meets the target)
        self.unit_biases: dict[str, list[str]] = {} # network -> its hidden layers' bias names (neuron only)
        self.masks: dict[str, torch.Tensor] = {}
        self.dense: dict[str, torch.Tensor] = {}    # magnitude-STE's dense weights
        self.saliency_sum: dict[str, torch.Tensor] = {}
        self.saliency_count = 0
        self.mask_updates = 0
        self.target = 0.0
        self.regrown = 0
        self.t_start = self.t_end = 0
        self._random: dict[str, torch.Tensor] | None = None
        self._mult: dict[str, torch.Tensor] = {}    # float keep-masks (1 kept, 0 pruned)
        self.checks = dict.fromkeys(CHECKS, 0)       # fault counters (module docstring)
        self._leaked: torch.Tensor | None = None     # pruned_nonzero_after_step not yet added (no sync per step)

    @property
    def active(self) -> bool:
        return self.criterion != "none"

    @property
    def ste(self) -> bool:
        return self.criterion == "magnitude_ste"

    @property
    def structured(self) -> bool:
        return self.criterion in STRUCTURED

    def add_mask_listener(self, fn) -> None:
        """``fn(trainer, pl_module, MaskUpdate)`` runs right after each mask update is applied."""
        if fn not in self.listeners:
            self.listeners.append(fn)

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage=None):
        nets = ("actor", "critic") if self.scope == "both" else (self.scope,)
        named = dict(pl_module.named_parameters())
        self.params, self.groups, self.unit_biases = {}, {}, {}
        for net in nets:
            prefix = NETWORKS[net]
            seq = pl_module.get_submodule(prefix)
            linear = [i for i, m in enumerate(seq) if isinstance(m, nn.Linear)]
            names = [f"{prefix}.{i}.weight" for i in linear]
            self.groups[net] = names
            self.params.update({n: named[n] for n in names})
            if self.structured:  # a removed unit's bias entry is masked too (all but the output layer)
                self.unit_biases[net] = [f"{prefix}.{i}.bias" for i in linear[:-1]]
                self.params.update({n: named[n] for n in self.unit_biases[net]})
        self.t_start, self.t_end = schedule_bounds(pl_module.total_updates, self.burn_in, self.end)

    def on_train_start(self, trainer, pl_module):
        # after a resume (optimiser state and this callback's state are restored before this
        # hook): masks onto the weights' device, the loaded weights checked and masked, and the
        # optimiser's moments of pruned entries zeroed (checkpoints written before that was done
        # hold non-zero ones)
        for store in (self.masks, self.dense, self.saliency_sum):
            for n in store:
                store[n] = store[n].to(self.params[n].device)
        self._mult = {}
        if self.masks:
            self.checks["pruned_nonzero_on_resume"] += int(self._count_pruned_nonzero())
        self._apply_masks()
        if not self.ste:
            self._zero_pruned_optimizer_state(trainer)

    # -- the training loop -------------------------------------------------------------------
    def _saliency_window(self, t: int) -> bool:
        """Saliency scores average the updates since the previous mask update (or the last
        ``interval`` updates before the first one)."""
        window = self.interval or 15
        last = self.t_start + 1 if self.interval == 0 else self.t_end
        return self.t_start - window < t <= last

    def on_after_backward(self, trainer, pl_module):
        # Inside manual_backward, before the module's global grad-norm clip: raw ∂L/∂w of this update
        if self.criterion == "saliency" and self._saliency_window(trainer.global_step + 1):
            self._accumulate_saliency()
        # pruned entries' gradients are zeroed, so neither the clip norm nor Adam's moments see
        # them; magnitude-STE trains its dense copy with the dense gradient
        if self.masks and not self.ste:
            self._mask_gradients()

    @torch.no_grad()
    def _accumulate_saliency(self) -> None:
        # |w·g| is 0 at pruned entries (w = 0) whether or not g is masked yet
        for n, p in self.params.items():
            if p.grad is None:
                continue
            s = (p * p.grad).abs()
            if n in self.saliency_sum:
                self.saliency_sum[n].add_(s)
            else:
                self.saliency_sum[n] = s
        self.saliency_count += 1

    @torch.no_grad()
    def _mask_gradients(self) -> None:
        mult = self._mults()
        names = [n for n in mult if self.params[n].grad is not None]
        if names:
            torch._foreach_mul_([self.params[n].grad for n in names], [mult[n] for n in names])

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
        elif self.masks:  # with masked gradients and moments the step cannot have moved them
            leaked = self._step_leaked()
            self._leaked = leaked if self._leaked is None else self._leaked + leaked
        self._apply_masks()
        t = trainer.global_step
        if is_mask_update(t, self.t_start, self.t_end, self.interval):
            self._update_masks(trainer, pl_module, t)

    def _mults(self) -> dict[str, torch.Tensor]:
        if len(self._mult) != len(self.masks):  # float copies: ~3× cheaper to multiply by than bools
            self._mult = {n: m.to(self.params[n].dtype) for n, m in self.masks.items()}
        return self._mult

    @torch.no_grad()
    def _apply_masks(self) -> None:
        mult = self._mults()
        if mult:
            torch._foreach_mul_([self.params[n] for n in mult], list(mult.values()))

    @torch.no_grad()
    def _step_leaked(self) -> torch.Tensor:
        """1 if a pruned entry of the module's weights is non-zero, else 0 (a tensor: no device sync).
        ‖W ⊙ (1 − M)‖ per weight with two fused ops: ~15× cheaper than counting the entries."""
        mult = self._mults()
        if getattr(self, "_inv_of", None) is not mult:  # 1 − M, cached with the masks' float copies
            self._inv, self._inv_of = {n: 1 - m for n, m in mult.items()}, mult
        names = list(mult)
        pruned = torch._foreach_mul([self.params[n] for n in names], [self._inv[n] for n in names])
        return (torch.stack(torch._foreach_norm(pruned)).sum() > 0).to(torch.long)

    @torch.no_grad()
    def _count_pruned_nonzero(self) -> torch.Tensor:
        """Pruned entries of the module's weights that are not zero (a tensor: no device sync)."""
        names = list(self.masks)
        counts = [torch.count_nonzero(self.params[n].masked_fill(self.masks[n], 0)) for n in names]
        return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.long)

    def _flush_leaked(self) -> None:
        if self._leaked is not None:
            self.checks["pruned_nonzero_after_step"] += int(self._leaked)
            self._leaked = None

    @torch.no_grad()
    def _zero_pruned_optimizer_state(self, trainer) -> None:
        """Zero the optimiser state of pruned entries (Adam's ``exp_avg``, ``exp_avg_sq``, …: every
        state tensor shaped like its parameter). Works wherever the pruned weights live in an
        optimiser's parameters: the weight itself, or a slice of a flat buffer
        (``prunerl.module.FlatParameters``)."""
        mult = self._mults()
        for opt in getattr(trainer, "optimizers", None) or []:
            for group in opt.param_groups:
                for big in group["params"]:
                    state = opt.state.get(big)
                    if not state:
                        continue
                    tensors = [v for v in state.values() if torch.is_tensor(v) and v.shape == big.shape]
                    for n, m in mult.items():
                        offset = _offset_in(self.params[n], big)
                        if offset is None:
                            continue
                        for v in tensors:
                            v.view(-1)[offset:offset + m.numel()].mul_(m.view(-1))

    @torch.no_grad()
    def _update_masks(self, trainer, pl_module, t: int) -> None:
        target = scheduled_sparsity(t, self.t_start, self.t_end, self.final_sparsity, self.interval)
        before = {n: (self.dense[n] if n in self.dense else p).detach().clone() for n, p in self.params.items()}
        ste = self.criterion == "magnitude_ste"
        new: dict[str, torch.Tensor] = {}
        if self.structured:  # whole hidden units: weight masks and the hidden biases' masks
            for net, names in self.groups.items():
                biases = self.unit_biases[net]
                previous = [self.masks[n] for n in biases] if self.masks else None
                weight_masks, units = neuron_masks([before[n] for n in names], target, previous)
                new.update(zip(names, weight_masks))
                new.update(zip(biases, units))
        else:
            scores = self._scores(before)
            for names in self.groups.values():
                previous = None if ste or not self.masks else {n: self.masks[n] for n in names}
                new.update(compute_masks({n: scores[n] for n in names}, target, self.allocation, previous))
        self.regrown = sum(int((m & ~self.masks[n]).sum()) for n, m in new.items()) if self.masks else 0
        if not ste:  # nested masks: a pruned weight never comes back
            self.checks["mask_regrown_entries"] += self.regrown
        for names in self.groups.values():  # exactly the scheduled number pruned in each network
            size = sum(new[n].numel() for n in names)
            pruned = sum(int((~new[n]).sum()) for n in names)
            slack = unit_tolerance([tuple(new[n].shape) for n in names]) if self.structured else 0
            self.checks["mask_count_off_entries"] += max(0, abs(pruned - round(target * size)) - slack)
        if ste and not self.dense:
            self.dense = {n: b.clone() for n, b in before.items()}
        self.masks, self._mult = new, {}
        for n, p in self.params.items():
            p.copy_(before[n] * new[n])
        if not ste:
            self._zero_pruned_optimizer_state(trainer)
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
        """Actual sparsity (exact zeros) of the Linear weights: global, actor, critic, per layer; and
        per hidden layer the fraction of its units that are removed (row, bias entry and outgoing
        column all exactly zero — what neuron pruning does; ~0 under elementwise pruning)."""
        layers: dict[str, float] = {}
        units: dict[str, float] = {}
        zeros = {"actor": 0, "critic": 0}
        sizes = {"actor": 0, "critic": 0}
        for net, prefix in NETWORKS.items():
            linear = [(i, m) for i, m in enumerate(pl_module.get_submodule(prefix)) if isinstance(m, nn.Linear)]
            for (i, m), nxt in zip(linear, [*linear[1:], None]):
                z = int((m.weight == 0).sum())
                layers[f"{prefix}.{i}"] = z / m.weight.numel()
                zeros[net] += z
                sizes[net] += m.weight.numel()
                if nxt is not None:
                    gone = (m.weight == 0).all(1) & (m.bias == 0) & (nxt[1].weight == 0).all(0)
                    units[f"{prefix}.{i}"] = float(gone.float().mean())
        weight_masks = {n: m for n, m in self.masks.items() if n.endswith(".weight")}
        return {
            "global": sum(zeros.values()) / sum(sizes.values()),
            "actor": zeros["actor"] / sizes["actor"],
            "critic": zeros["critic"] / sizes["critic"],
            "target": self.target,
            "masks": sparsity_of(weight_masks) if weight_masks else 0.0,
            "layers": layers,
            "units_removed": units,
        }

    def on_train_epoch_end(self, trainer, pl_module):
        if not self.active:
            return
        self._flush_leaked()
        if self.masks:  # the weights the next rollout is collected with
            self.checks["pruned_nonzero_at_rollout_end"] += int(self._count_pruned_nonzero())
        rows = getattr(pl_module, "rollout_metrics", None)
        if rows is None:
            return
        rows.update({f"prune/checks/{k}": float(v) for k, v in self.checks.items()})
        rep = self.sparsity_report(pl_module)
        rows.update({"prune/target_sparsity": rep["target"], "prune/sparsity": rep["global"],
                     "prune/sparsity_actor": rep["actor"], "prune/sparsity_critic": rep["critic"],
                     "prune/mask_updates": float(self.mask_updates)})
        rows.update({f"prune/sparsity/{k}": v for k, v in rep["layers"].items()})
        if self.structured:
            rows.update({f"prune/units_removed/{k}": v for k, v in rep["units_removed"].items()})
        if self.criterion == "magnitude_ste":
            rows["prune/regrown"] = float(self.regrown)

    def summary(self, trainer, pl_module) -> dict:
        self._flush_leaked()
        rep = self.sparsity_report(pl_module)
        return {
            "pruning_checks": dict(self.checks),
            "pruning_method": self.criterion,
            "final_sparsity": self.final_sparsity if self.active else 0.0,
            "sparsity": rep,
            "pruning": {"criterion": self.criterion, "allocation": self.allocation, "scope": self.scope,
                        "burn_in": self.burn_in, "end": self.end, "interval": self.interval,
                        "t_start": self.t_start, "t_end": self.t_end, "mask_updates": self.mask_updates},
        }

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._flush_leaked()
        return {
            "checks": dict(self.checks),
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
        # checkpoints written before the checks existed start them at 0
        self.checks = {**dict.fromkeys(CHECKS, 0), **state.get("checks", {})}
        self._leaked = None


def _offset_in(p: torch.Tensor, big: torch.Tensor) -> int | None:
    """Where ``p``'s entries start in ``big``'s flat layout, if ``p`` is ``big`` or a contiguous
    slice of it (FlatParameters' views); else None."""
    if p is big:
        return 0
    if (p.dtype != big.dtype or p.device != big.device or not p.is_contiguous() or not big.is_contiguous()
            or p.untyped_storage().data_ptr() != big.untyped_storage().data_ptr()):
        return None
    offset = (p.data_ptr() - big.data_ptr()) // big.element_size()
    return offset if 0 <= offset and offset + p.numel() <= big.numel() else None
