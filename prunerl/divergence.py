"""Divergence: a NaN or Inf anywhere in training stops the run at that update with one message.

Where it is looked for, and what it costs:

- every update (:meth:`prunerl.module.PPOModule.training_step`): the loss and the global gradient
  norm, one finiteness test of two scalars before the optimiser step — so the step that would
  write a NaN into the weights is never taken. When it fails, :func:`nonfinite_term` names the
  culprit, looking in the order a NaN spreads: parameters, the minibatch's inputs, the loss terms,
  the gradients;
- every rollout (:meth:`prunerl.data.RolloutDataModule.collect`): the observation normaliser's
  statistics, the rollout's observations, rewards, advantages and value targets;
- every rollout end, before any checkpoint is written (:class:`DivergenceGuard`): the parameters
  and the normaliser's statistics — so every checkpoint on disk is a good one.

``fit`` then keeps the newest checkpoint (the last good one), writes ``summary.json`` with
``"status": "diverged"``, the update ``t`` and the term, and the CLI exits with
:data:`EXIT_DIVERGED`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import lightning as L
import torch

#: ``fit``'s exit status when the run diverged (2 is bad input, 75 a preemption).
EXIT_DIVERGED = 3


class Diverged(RuntimeError):
    """Training produced a NaN/Inf: ``update`` is t (the update it was found at), ``term`` what."""

    def __init__(self, update: int, term: str):
        self.update, self.term = int(update), term
        super().__init__(f"training diverged at update t={self.update}: {term} is not finite (NaN or Inf)")


def nonfinite_term(groups: Iterable[tuple[str, Mapping[str, torch.Tensor | None]]]) -> str | None:
    """The first ``"<group> <name>"`` whose tensor holds a NaN/Inf, looking group by group in order."""
    for group, tensors in groups:
        for name, t in tensors.items():
            if t is not None and not bool(torch.isfinite(t).all()):
                return f"{group} {name}"
    return None


def check(update: int, groups: Iterable[tuple[str, Mapping[str, torch.Tensor | None]]]) -> None:
    """Raise :class:`Diverged` naming the first non-finite tensor of ``groups``, if any."""
    term = nonfinite_term(groups)
    if term is not None:
        raise Diverged(update, term)


def parameters_of(pl_module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in pl_module.named_parameters()}


def normalizer_statistics(normalizer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in normalizer.state_dict().items() if k != "running_return"}


class DivergenceGuard(L.Callback):
    """At every rollout end, before checkpoints are written (Lightning runs checkpoint callbacks
    last): parameters and normaliser statistics must be finite, so no checkpoint holds a NaN."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        groups = [("parameter", parameters_of(pl_module))]
        if trainer.datamodule is not None:
            groups.append(("observation normaliser statistic", normalizer_statistics(trainer.datamodule.normalizer)))
        check(trainer.global_step, groups)
