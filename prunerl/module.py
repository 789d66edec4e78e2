"""The LightningModule: PPO + SA loss (Sec. 4.2, Alg. 1 lines 5–8).

One Lightning training step is one minibatch update, so ``trainer.global_step`` is Algorithm 1's
update counter t; one Lightning epoch is one PPO iteration (one rollout, ``epochs × minibatches``
updates). Manual optimisation: the loss, gradient clipping and the optimiser step are spelled out.
"""

from __future__ import annotations

import lightning as L
import torch
from tensordict import TensorDictBase

from prunerl.divergence import Diverged, check, parameters_of
from prunerl.models import Critic, GaussianActor
from prunerl.ppo import ppo_diagnostics, ppo_loss_terms
from prunerl.sa import INPUT_GRADIENTS, SA_METHODS, plain_mlp, sa_regularizer, sa_regularizer_convex


class PPOModule(L.LightningModule):
    def __init__(self, actor: GaussianActor, critic: Critic, *, total_updates: int, lr: float = 3e-4,
                 adam_eps: float = 1e-5, clip: float = 0.2, vf_coef: float = 0.5,
                 ent_coef: float = 0.01, max_grad_norm: float = 1.0, normalize_advantage: bool = True,
                 kappa: float = 0.0, eps: float = 0.0, sa_steps: int = 10,
                 sa_step_ratio: float = 0.1, eps_ramp: float = 0.75, anneal_lr: bool = False,
                 updates_per_rollout: int | None = None, sa_input_gradient: str = "auto",
                 sa_method: str = "sgld", beta_start: float = 1.0, beta_end: float = 0.0,
                 beta_ramp: float = 0.75):
        super().__init__()
        self.automatic_optimization = False
        self.actor = actor
        self.critic = critic
        self.total_updates = total_updates
        self.lr, self.adam_eps = lr, adam_eps
        self.anneal_lr, self.updates_per_rollout = anneal_lr, updates_per_rollout
        if anneal_lr and not updates_per_rollout:
            raise ValueError("anneal_lr needs updates_per_rollout (the number of rollouts is T / it)")
        self.clip, self.vf_coef, self.ent_coef = clip, vf_coef, ent_coef
        self.max_grad_norm = max_grad_norm
        self.normalize_advantage = normalize_advantage
        self.kappa, self.eps = kappa, eps
        self.sa_steps, self.sa_step_ratio, self.eps_ramp = sa_steps, sa_step_ratio, eps_ramp
        # the inner loop's implementation (prunerl.sa.INPUT_GRADIENTS): "auto" is the fast path;
        # "reference" (the loop before it) is for the same-maths tests and benchmarks/sa_update.py
        if sa_input_gradient not in INPUT_GRADIENTS:
            raise ValueError(f"sa_input_gradient={sa_input_gradient!r} is not allowed; allowed: {list(INPUT_GRADIENTS)}")
        self.sa_input_gradient = sa_input_gradient
        if sa_method not in SA_METHODS:
            raise ValueError(f"algo.sa.method={sa_method!r} is not allowed; allowed: {list(SA_METHODS)}")
        if sa_method == "convex" and plain_mlp(actor) is None:
            raise ValueError("algo.sa.method=convex needs the actor's mean network to be a plain MLP of "
                             "nn.Linear and nn.Tanh/nn.ReLU layers (prunerl.models.mlp); this actor's is not")
        for name, v in (("beta_start", beta_start), ("beta_end", beta_end), ("beta_ramp", beta_ramp)):
            if not 0 <= v <= 1:
                raise ValueError(f"algo.sa.{name}={v!r} is outside [0, 1]")
        # convex relaxation: β (weight of CROWN-IBP against IBP) from beta_start to beta_end over beta_ramp of T
        self.sa_method, self.beta_start, self.beta_end, self.beta_ramp = sa_method, beta_start, beta_end, beta_ramp
        self._step_metrics: list[torch.Tensor] = []
        self._log_ratios: list[torch.Tensor] = []  # this rollout's log r, for ppo_diagnostics
        # figures callbacks (pruning, Lipschitz) add to this rollout's metrics row; merged and
        # cleared in on_train_epoch_end (callbacks' epoch-end hooks run before the module's)
        self.rollout_metrics: dict[str, float] = {}
        self.grad_norm: torch.Tensor | None = None  # the last update's global grad norm, before clipping
        self._metric_names: list[str] = []

    def __setattr__(self, name, value):
        # Lightning sets ``_current_fx_name`` on the module around every hook call, ~30 times per
        # training step; ``nn.Module.__setattr__`` (Parameter/Module/buffer bookkeeping) made that
        # ~70 µs of every update. A str/None is never a parameter, buffer or submodule.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def configure_optimizers(self):
        # One flat buffer for all parameters (and one for their gradients): clipping and Adam run
        # on one tensor. Fused Adam: one kernel instead of ~10 ops per tensor.
        self.flat = FlatParameters([*self.actor.parameters(), *self.critic.parameters()])
        params = [self.flat.param]
        return torch.optim.Adam(params, lr=self.lr, eps=self.adam_eps, fused=_fused_adam_ok(params))

    def on_train_epoch_start(self) -> None:
        self.flat.check()
        if self.anneal_lr:  # SA-PPO / CleanRL: lr_k = lr·(1 − k/K) for rollout k of K, k from 0
            k, n = self.global_step // self.updates_per_rollout, self.total_updates // self.updates_per_rollout
            for group in self.optimizers().optimizer.param_groups:
                group["lr"] = self.lr * (1.0 - k / n)

    def current_lr(self) -> float:
        return float(self.optimizers().optimizer.param_groups[0]["lr"])

    def sa_eps(self, t: int) -> float:
        """ε_t: ramped linearly from 0 to ε over the first ``eps_ramp`` of the T updates."""
        if self.eps_ramp <= 0:
            return self.eps
        return self.eps * min(1.0, t / (self.eps_ramp * self.total_updates))

    def sa_beta(self, t: int) -> float:
        """β_t of the convex relaxation (bound = β·CROWN-IBP + (1 − β)·IBP): linearly from
        ``beta_start`` to ``beta_end`` over the first ``beta_ramp`` of the T updates, then
        ``beta_end`` (``beta_ramp`` = 0: ``beta_end`` throughout). Default 1 → 0 over ¾, as SA-PPO's
        code (``prunerl.sa`` says why)."""
        if self.beta_ramp <= 0:
            return float(self.beta_end)
        f = min(1.0, t / (self.beta_ramp * self.total_updates))
        return min(1.0, max(0.0, (1 - f) * self.beta_start + f * self.beta_end))  # exact at both ends

    def training_step(self, batch: TensorDictBase, batch_idx: int):
        obs = batch["observation"]
        mean = self.actor(obs)
        logp = self.actor.log_prob(mean, batch["action"])
        value = self.critic(obs)
        # approx-KL and clip fraction once per rollout over all its updates' samples (the mean of
        # the per-minibatch figures; equal minibatches), not 8 small ops in every update
        terms = ppo_loss_terms(logp, batch["sample_log_prob"], batch["advantage"], value,
                               batch["value_target"], self.clip, self.normalize_advantage,
                               diagnostics=False)
        self._log_ratios.append(terms.pop("log_ratio"))
        loss = terms["loss_objective"] + self.vf_coef * terms["loss_critic"]
        if self.ent_coef != 0:
            entropy = self.actor.entropy()
            loss = loss - self.ent_coef * entropy
        else:  # same loss; keeps three nodes out of the backward graph
            with torch.no_grad():
                entropy = self.actor.entropy()
        metrics = {**terms, "entropy": entropy.detach()}
        if self.kappa > 0 and self.sa_method == "convex":  # the certified upper bound of the max-KL
            eps_t, beta_t = self.sa_eps(self.global_step), self.sa_beta(self.global_step)
            reg = sa_regularizer_convex(self.actor, obs, self.actor.std, eps_t, beta_t, mean=mean)
            loss = loss + self.kappa * reg
            metrics.update(loss_sa=reg.detach(), kl_bound=reg.detach(), sa_eps=torch.tensor(eps_t),
                           sa_beta=torch.tensor(beta_t))
        elif self.kappa > 0:  # κ = 0 skips the inner maximisation entirely
            eps_t = self.sa_eps(self.global_step)
            reg, kl_found = sa_regularizer(self.actor, obs, self.actor.std, eps_t, self.sa_steps,
                                           eps_t * self.sa_step_ratio, mean=mean,
                                           input_gradient=self.sa_input_gradient)
            loss = loss + self.kappa * reg
            metrics.update(loss_sa=reg.detach(), sa_kl=kl_found, sa_eps=torch.tensor(eps_t))
        metrics["loss"] = loss.detach()

        opt = self.optimizers()
        self.flat.zero_grad()
        # Lightning runs the callbacks' on_after_backward inside manual_backward: the pruning
        # callback zeroes pruned entries' gradients there, before this clip
        self.manual_backward(loss)
        # What ``self.clip_gradients(opt, max_grad_norm, "norm")`` does for 32-bit training: the
        # global norm of all gradients — here the norm of the one flat gradient (kept, unsynced).
        self.grad_norm = torch.nn.utils.clip_grad_norm_([self.flat.param], self.max_grad_norm, foreach=True)
        # one finiteness test per update (two scalars), before the step that would spread a NaN
        if not bool(torch.isfinite(loss.detach() + self.grad_norm)):
            self._diverged(batch, metrics)
        opt.step()

        # Accumulate cheaply; logged once per rollout (self.log per step costs more than a step).
        if not self._metric_names:
            self._metric_names = list(metrics)
        self._step_metrics.append(torch.stack([metrics[k].float() for k in self._metric_names]))

    def _diverged(self, batch: TensorDictBase, metrics: dict) -> None:
        """Name what is not finite, in the order a NaN spreads (weights → inputs → loss → grads)."""
        inputs = {k: batch[k] for k in ("observation", "action", "sample_log_prob", "advantage", "value_target")}
        grads = {n: p.grad for n, p in self.named_parameters()}
        check(self.global_step, [("parameter", parameters_of(self)), ("minibatch input", inputs),
                                 ("loss term", metrics), ("gradient of", grads)])
        raise Diverged(self.global_step, "the global gradient norm")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        dm = self.trainer.datamodule
        checkpoint["prunerl"] = {
            "config": getattr(self, "run_config", None),
            "frames": dm.frames if dm is not None else None,
            "datamodule_key": type(dm).__qualname__ if dm is not None else None,
        }

    def on_train_epoch_end(self):
        """Log one row per rollout at step t (Lightning's epoch-end logging would use t − 1)."""
        row: dict[str, float] = {"train/update": float(self.global_step), "train/lr": self.current_lr()}
        dm = self.trainer.datamodule
        if dm is not None:
            row["train/frames"] = float(dm.frames)
            row["train/episode_return"] = dm.train_return
            if dm.recent_lengths:
                row["train/episode_length"] = sum(dm.recent_lengths) / len(dm.recent_lengths)
        if self._step_metrics:
            means = torch.stack(self._step_metrics).mean(0).tolist()
            self._step_metrics.clear()
            for name, v in zip(self._metric_names, means):
                row[_METRIC_PREFIX.get(name, "ppo/") + name] = v
        if self._log_ratios:
            diag = ppo_diagnostics(torch.cat(self._log_ratios), self.clip)
            self._log_ratios.clear()
            row.update({"ppo/" + k: float(v) for k, v in diag.items()})
        row.update(self.rollout_metrics)
        self.rollout_metrics.clear()
        for logger in self.loggers:
            logger.log_metrics(row, step=self.global_step)
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in row.items()})


_METRIC_PREFIX = {"loss_objective": "loss/", "loss_critic": "loss/", "loss": "loss/", "entropy": "loss/",
                  "loss_sa": "sa/", "sa_kl": "sa/", "sa_eps": "sa/", "kl_bound": "sa/", "sa_beta": "sa/"}


class FlatParameters:
    """Parameters as views of one flat buffer, and their gradients as views of another.

    Gradient clipping, zeroing and Adam then touch one tensor instead of one per layer: the same
    arithmetic (the global norm to float rounding) for 0.1–0.3 ms less per 64x64 update on a CPU core
    (benchmarks/README.md). The modules keep their own ``Parameter`` objects — state dicts,
    pruning masks (applied in place), the collector's policy see no difference; only the storage
    moved. Autograd accumulates into an existing ``.grad`` in place, so gradients land in the flat
    buffer; :meth:`zero_grad` re-attaches any ``.grad`` someone replaced or set to ``None``.
    """

    def __init__(self, params: list[torch.Tensor]):
        if not params:
            raise ValueError("FlatParameters needs at least one parameter")
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) != 1:
            raise ValueError(f"FlatParameters needs one dtype and device, got {sorted(map(str, kinds))}")
        dtype, device = kinds.pop()
        self.params = params
        self.param = torch.nn.Parameter(torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device))
        self.param.grad = torch.zeros_like(self.param)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.param[offset:offset + n].copy_(p.reshape(-1))
                p.data = self.param.data[offset:offset + n].view_as(p)
                p.grad = self.param.grad[offset:offset + n].view_as(p)
                offset += n
        self._grads = [p.grad for p in params]
        self._ptrs = [p.data_ptr() for p in params]

    def zero_grad(self) -> None:
        self.param.grad.zero_()
        for p, g in zip(self.params, self._grads):
            if p.grad is not g:
                p.grad = g

    def check(self) -> None:
        """Raise if a parameter's storage was replaced (``p.data = ...``): the optimiser would
        then update a buffer the module no longer reads."""
        for i, (p, ptr) in enumerate(zip(self.params, self._ptrs)):
            if p.data_ptr() != ptr:
                raise RuntimeError(f"parameter {i} {tuple(p.shape)} no longer lives in the flat parameter "
                                   "buffer (its .data was reassigned); modify parameters in place")


def _fused_adam_ok(params: list[torch.Tensor]) -> bool | None:
    """Fused Adam where torch supports it for these parameters (CPU and CUDA floats), else default."""
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok and params else None
