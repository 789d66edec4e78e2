"""Lipschitz and certified-robustness tracking (Thm. 1, Lemma 1, Thm. 3) as a Lightning callback.

Every ``every_n_updates`` updates it measures, for the actor's mean network and the critic: the
surrogate L̃ (``prunerl.lipschitz.lipschitz_surrogate`` — the one implementation), the product
of exact spectral norms (tighter, but not monotone under pruning), and for the actor the local
Jacobian norms ‖J(s)‖_op (mean and max over recently visited normalised states) and the
certified bound α·c·L̃·ε.

At each mask update (the pruning callback calls :meth:`on_mask_update` right after applying the
masks, with the weights as they were just before; no optimiser step in between) it compares L̃
before and after — ``lipschitz/monotonicity_violations`` counts the updates where it rose, which
Thm. 1 rules out for elementwise pruning — and computes Thm. 3's terms for the actor:
α·c·L_par(θ,θ′)·‖Δθ‖ and α·c·L̃_θ′·ε. For magnitude-STE, "before" is the dense weights the new
mask is applied to (what the STE trains), so a weight coming back is not counted as pruning.
"""

from __future__ import annotations

import lightning as L
import torch

from prunerl.lipschitz import (certified_bound, gaussian_c, jacobian_norms, lipschitz_surrogate,
                               parameter_distance, path_sensitivity, robustness_alpha,
                               spectral_product)

NETWORKS = {"actor": "actor.mean_net", "critic": "critic.value_net"}


class LipschitzCallback(L.Callback):
    def __init__(self, eps: float, gamma: float, r_max: float, every_n_updates: int = 256,
                 states: int = 128, path_states: int = 32, quadrature_points: int = 2,
                 full_every_n_mask_updates: int = 16):
        """``states``: recent normalised states for the Jacobian norms; ``path_states`` and
        ``quadrature_points``: the batch and Gauss–Legendre nodes of L_par; the spectral product
        and Jacobian norms before/after a mask update are taken at every
        ``full_every_n_mask_updates``-th one (L̃ and Thm. 3's terms at every one)."""
        for name, v in (("every_n_updates", every_n_updates), ("states", states), ("path_states", path_states),
                        ("quadrature_points", quadrature_points),
                        ("full_every_n_mask_updates", full_every_n_mask_updates)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"lipschitz.{name}={v!r} must be a positive integer")
        self.eps, self.gamma, self.r_max = float(eps), float(gamma), float(r_max)
        self.every_n_updates, self.states, self.path_states = every_n_updates, states, path_states
        self.quadrature_points, self.full_every = quadrature_points, full_every_n_mask_updates
        self.violations = 0
        self.mask_updates = 0
        self.at_pruning_start: dict[str, float] | None = None   # L̃ just before the first mask update
        self.last_update: dict[str, float] = {}
        self.latest: dict[str, float] = {}
        self._pending: dict[str, float] = {}

    # -- wiring ------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage=None):
        for cb in trainer.callbacks:  # listen to whichever callback updates masks
            if hasattr(cb, "add_mask_listener"):
                cb.add_mask_listener(self.on_mask_update)

    def _constants(self, pl_module) -> tuple[float, float]:
        return robustness_alpha(self.gamma, self.r_max), gaussian_c(pl_module.actor.std)

    def _recent_states(self, trainer, n: int) -> torch.Tensor | None:
        """Up to n normalised states of the newest rollout, evenly strided (no RNG used)."""
        dm = trainer.datamodule
        rollout = getattr(dm, "last_rollout", None)
        if rollout is None:
            return None
        obs = rollout["observation"]
        return obs[:: max(1, obs.shape[0] // n)][:n]

    @staticmethod
    def _weights(pl_module, net: str, override: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        prefix = NETWORKS[net]
        seq = pl_module.get_submodule(prefix)
        out = []
        for i, m in enumerate(seq):
            if isinstance(m, torch.nn.Linear):
                name = f"{prefix}.{i}.weight"
                out.append(override[name] if override and name in override else m.weight.detach())
        return out

    # -- measurements ------------------------------------------------------------------------
    def measure(self, trainer, pl_module) -> dict[str, float]:
        """The periodic figures (also what ``summary`` reports at the end)."""
        alpha, c = self._constants(pl_module)
        actor, critic = pl_module.actor.mean_net, pl_module.critic.value_net
        out = {
            "lipschitz/surrogate_actor": lipschitz_surrogate(actor),
            "lipschitz/surrogate_critic": lipschitz_surrogate(critic),
            "lipschitz/spectral_actor": spectral_product(actor),
            "lipschitz/spectral_critic": spectral_product(critic),
        }
        out["lipschitz/certified_bound"] = certified_bound(out["lipschitz/surrogate_actor"], self.eps,
                                                           self.gamma, self.r_max, pl_module.actor.std)
        states = self._recent_states(trainer, self.states)
        if states is not None:
            j = jacobian_norms(actor, states)
            out["lipschitz/jacobian_mean"] = float(j.mean())
            out["lipschitz/jacobian_max"] = float(j.max())
            # Lemma 1's first-order local bound, α·c·max_s ‖J(s)‖·ε (β-term left out)
            out["lipschitz/local_bound"] = alpha * c * out["lipschitz/jacobian_max"] * self.eps
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_updates == 0:
            self.latest = self.measure(trainer, pl_module)
            self._pending.update(self.latest)

    def on_mask_update(self, trainer, pl_module, update) -> None:
        """Right after the masks of ``update`` were applied; ``update.before`` holds θ."""
        alpha, c = self._constants(pl_module)
        full = self.mask_updates % self.full_every == 0
        self.mask_updates += 1
        row: dict[str, float] = {}
        rose = False
        for net in NETWORKS:
            seq = pl_module.get_submodule(NETWORKS[net])
            before = self._weights(pl_module, net, update.before)
            after = self._weights(pl_module, net)
            lt_before, lt_after = lipschitz_surrogate(seq, before), lipschitz_surrogate(seq, after)
            rose |= lt_after > lt_before  # Thm. 1: impossible for elementwise pruning
            row[f"lipschitz/surrogate_{net}_before"] = lt_before
            row[f"lipschitz/surrogate_{net}_after"] = lt_after
            if full:
                row[f"lipschitz/spectral_{net}_before"] = spectral_product(seq, before)
                row[f"lipschitz/spectral_{net}_after"] = spectral_product(seq, after)
        if self.at_pruning_start is None:
            self.at_pruning_start = {net: row[f"lipschitz/surrogate_{net}_before"] for net in NETWORKS}
        self.violations += int(rose)
        # Thm. 3 for the policy (the actor's mean network): θ = before, θ′ = after
        actor = pl_module.actor.mean_net
        theta, theta_p = self._weights(pl_module, "actor", update.before), self._weights(pl_module, "actor")
        dist = parameter_distance(theta, theta_p)
        row["lipschitz/delta_theta"] = dist
        row["lipschitz/thm3_robustness_gap"] = alpha * c * row["lipschitz/surrogate_actor_after"] * self.eps
        states = self._recent_states(trainer, self.path_states)
        if states is not None:
            lpar = path_sensitivity(actor, states, theta, theta_p, self.quadrature_points) if dist > 0 else 0.0
            row["lipschitz/path_sensitivity"] = lpar
            row["lipschitz/thm3_pruning_loss"] = alpha * c * lpar * dist
            if full:
                jstates = self._recent_states(trainer, self.states)
                row["lipschitz/jacobian_max_before"] = float(jacobian_norms(actor, jstates, theta).max())
                row["lipschitz/jacobian_max_after"] = float(jacobian_norms(actor, jstates, theta_p).max())
        row["lipschitz/monotonicity_violations"] = float(self.violations)
        self.last_update = row
        self._pending.update(row)

    def on_train_epoch_end(self, trainer, pl_module):
        rows = getattr(pl_module, "rollout_metrics", None)
        if rows is not None:
            rows.update(self._pending)
            rows["lipschitz/monotonicity_violations"] = float(self.violations)
        self._pending = {}

    def summary(self, trainer, pl_module) -> dict:
        final = self.measure(trainer, pl_module)
        alpha, c = self._constants(pl_module)
        strip = {k.removeprefix("lipschitz/"): v for k, v in final.items()}
        return {
            "lipschitz_surrogate": final["lipschitz/surrogate_actor"],
            "certified_bound": final["lipschitz/certified_bound"],
            "lipschitz": {
                **strip,
                "surrogate_at_pruning_start": self.at_pruning_start,
                "monotonicity_violations": self.violations,
                "mask_updates": self.mask_updates,
                "last_mask_update": {k.removeprefix("lipschitz/"): v for k, v in self.last_update.items()},
                "alpha": alpha, "c": c, "eps": self.eps, "r_max": self.r_max, "gamma": self.gamma,
            },
        }

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"violations": self.violations, "mask_updates": self.mask_updates,
                "at_pruning_start": self.at_pruning_start, "last_update": self.last_update}

    def load_state_dict(self, state: dict) -> None:
        self.violations, self.mask_updates = state["violations"], state["mask_updates"]
        self.at_pruning_start, self.last_update = state["at_pruning_start"], state["last_update"]

