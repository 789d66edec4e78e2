"""Lipschitz and certified-robustness tracking (Thm. 1, Lemma 1, Thm. 3) as a Lightning callback.

The ball. The attacks and the SA regulariser perturb the normalised observation within the ℓ∞
ball ‖ŝ−s‖∞ ≤ ε; Appendix B's bound is stated for the ℓ2 ball. Every bound here is stated for the
ℓ∞ ball of radius ε (``prunerl.lipschitz``, ``ball="linf"``): the certified bound is α·c·L̃_∞·ε
with L̃_∞ = L̃ with the first layer's factor replaced by ‖|W₁|𝟙‖₂, so L̃ ≤ L̃_∞ ≤ √d·L̃ (d the
observation dimension). The ℓ2-ball figure α·c·L̃·ε is kept as ``certified_bound_l2ball``.

Every ``every_n_updates`` updates it measures, for the actor's mean network and the critic: the
surrogate L̃ of Thm. 1 (``prunerl.lipschitz.lipschitz_surrogate`` — the one implementation), the
product of exact spectral norms (tighter, but not monotone under pruning), and for the actor L̃_∞,
the certified bound, the local Jacobian norms ‖J(s)‖_op (mean and max over recently visited
normalised states) and Lemma 1's first-order local *estimate* α·c·max_s ‖|J(s)|𝟙‖₂·ε — an
estimate, not a bound: it leaves out Lemma 1's ½βε² term and takes the maximum over sampled
states only.

At each mask update (the pruning callback calls :meth:`on_mask_update` right after applying the
masks, with the weights as they were just before; no optimiser step in between) it computes
Thm. 3's terms for the actor, α·c·L_par(θ,θ′)·‖Δθ‖ and α·c·L̃_∞,θ′·ε, and two figures:
- ``lipschitz/thm1_sanity_violations``: mask updates at which L̃ or L̃_∞ of the module's weights
  rose from the weights the masks were applied to. Thm. 1 rules that out for any elementwise
  pruning, so this only checks that the module's weights are an elementwise pruning of "before"
  (a sanity check: it cannot see a fault that keeps them so — the pruning callback's ``checks``
  look for those);
- ``lipschitz/surrogate_growth_since_mask_update_{actor,critic}``: L̃ just before this mask update
  over L̃ just after the previous one — how much training raised L̃ between prunes (Sec. 3's
  training remark: Thm. 1 holds for pruning on fixed weights; gradient steps may enlarge them).
  A figure, not a violation.
For magnitude-STE, "before" is the dense weights the new mask is applied to (what the STE
trains), so a weight coming back is not counted as pruning.

Per-state certificates (issue 14; ``prunerl.certify``): with the periodic figures, over the same
recent states as the Jacobian norms, sound upper bounds Δ(s) on max_{ŝ∈B∞(s,ε)} ‖μ(ŝ)−μ(s)‖₂ by
IBP and by CROWN (``certificates``), and the certified TV bound c·Δ(s) of Lemma 1; their mean,
median and 95th percentile and the fraction of states with c·Δ(s) ≤ ``certificate_threshold`` go to
the metrics (``lipschitz/cert_*``) beside the global L̃_∞·ε, and to summary.json's ``certificates``.
Unlike L̃, they are bounds at the visited states only (not at every state), and not monotone under
pruning.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from prunerl.certify import (certified_deviation, certified_tv, check_certificate_settings, distribution)
from prunerl.lipschitz import (certified_bound, gaussian_c, jacobian_norms, lipschitz_surrogate,
                               parameter_distance, path_sensitivity, robustness_alpha,
                               spectral_product)

NETWORKS = {"actor": "actor.mean_net", "critic": "critic.value_net"}
BALL = "linf"  # the attacks' and the SA regulariser's ball: ‖ŝ−s‖∞ ≤ ε in normalised observation space


class LipschitzCallback(L.Callback):
    def __init__(self, eps: float, gamma: float, r_max: float, every_n_updates: int = 256,
                 states: int = 128, path_states: int = 32, quadrature_points: int = 2,
                 full_every_n_mask_updates: int = 16, certificates=("ibp", "crown"),
                 certificate_threshold: float = 0.1):
        """``eps``: the radius of the ℓ∞ ball the bounds are stated for; ``states``: recent
        normalised states for the Jacobian norms; ``path_states`` and ``quadrature_points``: the
        batch and Gauss–Legendre nodes of L_par; the spectral product and Jacobian norms
        before/after a mask update are taken at every ``full_every_n_mask_updates``-th one (L̃
        and Thm. 3's terms at every one); ``certificates``: the per-state certificate methods
        (``prunerl.certify``: ``ibp``, ``crown``; empty: none) over the same ``states``, and
        ``certificate_threshold`` the TV bound c·Δ(s) at or below which a state counts as certified."""
        for name, v in (("every_n_updates", every_n_updates), ("states", states), ("path_states", path_states),
                        ("quadrature_points", quadrature_points),
                        ("full_every_n_mask_updates", full_every_n_mask_updates)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"lipschitz.{name}={v!r} must be a positive integer")
        self.certificates, self.certificate_threshold = check_certificate_settings(
            list(certificates) if certificates is not None and not isinstance(certificates, str) else certificates,
            certificate_threshold, prefix="lipschitz.")
        self.latest_certificates: dict | None = None
        self.eps, self.gamma, self.r_max = float(eps), float(gamma), float(r_max)
        self.every_n_updates, self.states, self.path_states = every_n_updates, states, path_states
        self.quadrature_points, self.full_every = quadrature_points, full_every_n_mask_updates
        self.thm1_violations = 0
        self.mask_updates = 0
        self.at_pruning_start: dict[str, float] | None = None   # L̃ just before the first mask update
        self.after_last_update: dict[str, float] | None = None  # L̃ just after the latest mask update
        # Σ log(L̃ ratio) over the pruning phase: between mask updates (training) and at them (pruning)
        self.log_change = {net: {"training": 0.0, "pruning": 0.0} for net in NETWORKS}
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

    @staticmethod
    def obs_dim(pl_module) -> int:
        """d: the actor's input (normalised observation) dimension."""
        return next(m for m in pl_module.actor.mean_net if isinstance(m, torch.nn.Linear)).in_features

    def _recent_states(self, trainer, n: int) -> torch.Tensor | None:
        """Up to n normalised states of the newest rollout, evenly strided (no RNG used)."""
        dm = getattr(trainer, "datamodule", None)
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
        self.latest_certificates = None
        out = {
            "lipschitz/surrogate_actor": lipschitz_surrogate(actor),
            "lipschitz/surrogate_linf_actor": lipschitz_surrogate(actor, ball=BALL),
            "lipschitz/surrogate_critic": lipschitz_surrogate(critic),
            "lipschitz/spectral_actor": spectral_product(actor),
            "lipschitz/spectral_critic": spectral_product(critic),
            "lipschitz/c": c,  # c = 1/sqrt(2π σ²_min) of the σ now (a learned σ moves)
            "lipschitz/sigma_min": float(pl_module.actor.std.detach().min()),
        }
        # Thm. 1 for the attacks' ℓ∞ ball of radius ε; App. B's ℓ2-ball figure kept by its name
        out["lipschitz/certified_bound"] = certified_bound(out["lipschitz/surrogate_linf_actor"], self.eps,
                                                           self.gamma, self.r_max, pl_module.actor.std)
        out["lipschitz/certified_bound_l2ball"] = certified_bound(out["lipschitz/surrogate_actor"], self.eps,
                                                                  self.gamma, self.r_max, pl_module.actor.std)
        states = self._recent_states(trainer, self.states)
        if states is not None:
            j = jacobian_norms(actor, states)
            out["lipschitz/jacobian_mean"] = float(j.mean())
            out["lipschitz/jacobian_max"] = float(j.max())
            # Lemma 1's first-order term for the ℓ∞ ball, max over the sampled states: an
            # estimate (no ½βε², states not exhaustive), not a bound
            out["lipschitz/jacobian_linf_max"] = float(jacobian_norms(actor, states, ball=BALL).max())
            out["lipschitz/local_estimate"] = alpha * c * out["lipschitz/jacobian_linf_max"] * self.eps
            if self.certificates:
                self.latest_certificates = self.certify(actor, states, c, out["lipschitz/surrogate_linf_actor"])
                out.update(_flatten_certificates(self.latest_certificates))
        return out

    def certify(self, actor, states: torch.Tensor, c: float, surrogate_linf: float) -> dict:
        """Issue 14: the per-state certificates over ``states`` — for each method the distribution
        (mean, median, p95) of Δ(s) ≥ max_{ŝ∈B∞(s,ε)} ‖μ(ŝ)−μ(s)‖₂ and of the TV bound c·Δ(s), and
        the fraction of states with c·Δ(s) ≤ ``certificate_threshold``; beside them the global
        figures L̃_∞·ε and c·L̃_∞·ε that hold at every state."""
        out = {"ball": BALL, "eps": self.eps, "states": int(states.shape[0]), "c": c,
               "threshold": self.certificate_threshold,
               "global": {"dmu": surrogate_linf * self.eps, "tv": c * surrogate_linf * self.eps}}
        for method in self.certificates:
            dev = certified_deviation(actor, states, self.eps, method)
            out[method] = {"dmu": distribution(dev),
                           "tv": distribution(certified_tv(dev, c), self.certificate_threshold)}
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
            li_before, li_after = lipschitz_surrogate(seq, before, BALL), lipschitz_surrogate(seq, after, BALL)
            rose |= lt_after > lt_before or li_after > li_before  # Thm. 1: impossible for elementwise pruning
            row[f"lipschitz/surrogate_{net}_before"] = lt_before
            row[f"lipschitz/surrogate_{net}_after"] = lt_after
            if net == "actor":
                row["lipschitz/surrogate_linf_actor_before"] = li_before
                row["lipschitz/surrogate_linf_actor_after"] = li_after
            if self.after_last_update is not None:  # training between the previous mask update and this one
                growth = _ratio(lt_before, self.after_last_update[net])
                row[f"lipschitz/surrogate_growth_since_mask_update_{net}"] = growth
                self.log_change[net]["training"] += math.log(growth) if growth > 0 else math.nan
            drop = _ratio(lt_after, lt_before)
            self.log_change[net]["pruning"] += math.log(drop) if drop > 0 else math.nan
            if full:
                row[f"lipschitz/spectral_{net}_before"] = spectral_product(seq, before)
                row[f"lipschitz/spectral_{net}_after"] = spectral_product(seq, after)
        if self.at_pruning_start is None:
            self.at_pruning_start = {net: row[f"lipschitz/surrogate_{net}_before"] for net in NETWORKS}
        self.after_last_update = {net: row[f"lipschitz/surrogate_{net}_after"] for net in NETWORKS}
        self.thm1_violations += int(rose)
        # Thm. 3 for the policy (the actor's mean network): θ = before, θ′ = after
        actor = pl_module.actor.mean_net
        theta, theta_p = self._weights(pl_module, "actor", update.before), self._weights(pl_module, "actor")
        dist = parameter_distance(theta, theta_p)
        row["lipschitz/delta_theta"] = dist
        row["lipschitz/c"] = c  # c of the σ at this update (a learned σ moves: the figures use the σ of their time)
        row["lipschitz/thm3_robustness_gap"] = alpha * c * row["lipschitz/surrogate_linf_actor_after"] * self.eps
        states = self._recent_states(trainer, self.path_states)
        if states is not None:
            lpar = path_sensitivity(actor, states, theta, theta_p, self.quadrature_points) if dist > 0 else 0.0
            row["lipschitz/path_sensitivity"] = lpar
            row["lipschitz/thm3_pruning_loss"] = alpha * c * lpar * dist
            if full:
                jstates = self._recent_states(trainer, self.states)
                row["lipschitz/jacobian_max_before"] = float(jacobian_norms(actor, jstates, theta).max())
                row["lipschitz/jacobian_max_after"] = float(jacobian_norms(actor, jstates, theta_p).max())
        row["lipschitz/thm1_sanity_violations"] = float(self.thm1_violations)
        self.last_update = row
        self._pending.update(row)

    def on_train_epoch_end(self, trainer, pl_module):
        rows = getattr(pl_module, "rollout_metrics", None)
        if rows is not None:
            rows.update(self._pending)
            rows["lipschitz/thm1_sanity_violations"] = float(self.thm1_violations)
        self._pending = {}

    def summary(self, trainer, pl_module) -> dict:
        final = self.measure(trainer, pl_module)
        alpha, c = self._constants(pl_module)
        strip = {k.removeprefix("lipschitz/"): v for k, v in final.items() if not k.startswith("lipschitz/cert_")}
        growth = None
        if self.after_last_update is not None:
            growth = {net: _ratio(final[f"lipschitz/surrogate_{net}"], self.after_last_update[net]) for net in NETWORKS}
        return {
            "lipschitz_surrogate": final["lipschitz/surrogate_actor"],
            "lipschitz_surrogate_linf": final["lipschitz/surrogate_linf_actor"],
            "certified_bound": final["lipschitz/certified_bound"],
            "certified_bound_ball": BALL,
            "certified_bound_eps": self.eps,
            "certified_bound_l2ball": final["lipschitz/certified_bound_l2ball"],
            "obs_dim": self.obs_dim(pl_module),
            # per-state certificates over the last rollout's states (None: no rollout, or none asked for)
            "certificates": self.latest_certificates if self.certificates else None,
            "lipschitz": {
                **strip,
                "surrogate_at_pruning_start": self.at_pruning_start,
                "surrogate_growth_since_last_mask_update": growth,
                "surrogate_log_change": self.log_change if self.mask_updates else None,
                "thm1_sanity_violations": self.thm1_violations,
                "mask_updates": self.mask_updates,
                "last_mask_update": {k.removeprefix("lipschitz/"): v for k, v in self.last_update.items()},
                "alpha": alpha, "c": c, "eps": self.eps, "ball": BALL, "r_max": self.r_max, "gamma": self.gamma,
            },
        }

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"thm1_violations": self.thm1_violations, "mask_updates": self.mask_updates,
                "at_pruning_start": self.at_pruning_start, "after_last_update": self.after_last_update,
                "log_change": self.log_change, "last_update": self.last_update}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints written before the ℓ∞ figures and the growth tracking lack some keys
        self.thm1_violations = state.get("thm1_violations", state.get("violations", 0))
        self.mask_updates = state["mask_updates"]
        self.at_pruning_start, self.last_update = state["at_pruning_start"], state["last_update"]
        self.after_last_update = state.get("after_last_update")
        if self.after_last_update is None and self.last_update:
            self.after_last_update = {net: self.last_update[f"lipschitz/surrogate_{net}_after"] for net in NETWORKS}
        self.log_change = state.get("log_change", {net: {"training": 0.0, "pruning": 0.0} for net in NETWORKS})


def _flatten_certificates(cert: dict) -> dict[str, float]:
    """Metric rows: lipschitz/cert_{method}_{dmu,tv}_{mean,median,p95}, lipschitz/cert_{method}_certified_frac
    and lipschitz/cert_global_{dmu,tv}."""
    out = {f"lipschitz/cert_global_{k}": v for k, v in cert["global"].items()}
    for method in ("ibp", "crown"):
        if method in cert:
            for q in ("dmu", "tv"):
                for stat in ("mean", "median", "p95"):
                    out[f"lipschitz/cert_{method}_{q}_{stat}"] = cert[method][q][stat]
            out[f"lipschitz/cert_{method}_certified_frac"] = cert[method]["tv"]["frac_below"]
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan
