"""Adversarial evaluation while training (paper Sec. 4.3): the frozen policy, clean and under attacks.

Every ``every_frames`` frames (if set) and at the end of ``fit``, the current actor and critic are
copied and frozen with the current normaliser statistics, then rolled out for ``episodes``
episodes clean and under each attack of ``attacks`` (:func:`prunerl.evaluate.evaluate_policy`).
Logged as ``eval/clean/return``, ``eval/<attack>/return``, ``eval/<attack>/perturbation`` (mean
‖ŝ−s‖∞ per step), ``eval/robust/return`` (worst attack) and ``eval/robust_avg/return`` (mean over
attacks) at the current update t, and with ``stochastic: true`` the same under ``eval_stochastic/``.
The last evaluation goes to ``summary.json``: ``clean_return``, ``attack_returns``,
``robust_return``, ``robust_return_avg`` (in the mode ``evaluation.deterministic`` says),
``evaluation_stochastic`` = ``{"clean_return", "attack_returns"}`` with sampled actions (when
``stochastic: true``), and the settings, standard deviations and the trained attacks' scans
(``rs_scan``, ``optimal_scan``) under ``evaluation``. The default is 10 episodes, deterministic only, to keep ``fit`` quick;
``python -m prunerl evaluate`` defaults to 50 episodes, both modes.

Training is not disturbed: the evaluation runs its own envs, draws from its own generators and
restores torch's global RNG (which the checkpoint carries for exact resume). ``rs`` and
``optimal`` need a checkpoint to cache their trained models beside: one is written to
``checkpoints/eval-f<frames>.ckpt`` when they are asked for. A preemption signal that the training
of a learned adversary takes (its nested ``fit`` has its own handlers) stops the run as
:class:`~prunerl.preemption.Preemption` does; the resumed run repeats that evaluation.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch

from prunerl.attacks import TRAINED_ATTACKS
from prunerl.envs import DEFAULT_ENGINE
from prunerl.evaluate import evaluate_policy
from prunerl.preemption import Interrupted


class AdversarialEvaluation(L.Callback):
    def __init__(self, settings):
        super().__init__()
        self.settings = settings
        self.every = settings.every_frames
        self.next_at = self.every
        self.history: list[dict] = []
        self.last: dict | None = None
        self.interrupted: str | None = None   # a signal's name, when it cut the evaluation

    def on_train_epoch_end(self, trainer, pl_module):
        frames = trainer.datamodule.frames
        if self.every and frames >= self.next_at:
            try:
                self.evaluate(trainer, pl_module)
            except Interrupted as e:   # a learned adversary's training took the signal: stop as Preemption
                self.interrupted = str(e)   # would (checkpoint, summary, exit 75); the resumed run
                trainer.should_stop = True  # evaluates here again (next_at not advanced)
                return
            self.next_at = (frames // self.every + 1) * self.every

    def on_train_end(self, trainer, pl_module):
        self.finish(trainer, pl_module)

    def done(self, trainer) -> bool:
        """Whether the policy as it is now has been evaluated (the end-of-run evaluation is done)."""
        return self.last is not None and self.last["frames"] == trainer.datamodule.frames

    def finish(self, trainer, pl_module) -> None:
        """The end-of-run evaluation; also called by ``fit`` when a run resumed from its final
        checkpoint (Lightning then trains nothing and calls no ``on_train_end``)."""
        if self.done(trainer) or any(getattr(c, "interrupted", None) for c in trainer.callbacks):
            return  # a preempted run is evaluated when it has finished (after resume)
        try:
            self.evaluate(trainer, pl_module)
        except Interrupted as e:   # the learned adversary's training was preempted: resume later
            self.interrupted = str(e)

    def evaluate(self, trainer, pl_module) -> dict:
        dm = trainer.datamodule
        task = pl_module.run_config["env"]["name"]
        victim_path = None
        if any(a in TRAINED_ATTACKS for a in self.settings.attacks):
            victim_path = Path(trainer.default_root_dir) / "checkpoints" / f"eval-f{dm.frames}.ckpt"
            trainer.save_checkpoint(victim_path, weights_only=False)
        actor, critic = copy.deepcopy(pl_module.actor), copy.deepcopy(pl_module.critic)
        norm_state = {k: v.clone() for k, v in dm.normalizer.state_dict().items()}
        with torch.random.fork_rng(devices=[]):
            result = evaluate_policy(actor, critic, norm_state, task, self.settings, victim_path=victim_path,
                                     device=pl_module.device, log=lambda msg: None,
                                     run_eps=pl_module.run_config["env"].get("eps"),
                                     engine=pl_module.run_config["env"].get("engine", DEFAULT_ENGINE))
        result["frames"] = dm.frames
        row = {"eval/clean/return": result["clean_return"], "eval/clean/length": result["clean"]["mean_length"]}
        for name, r in result["attacks"].items():
            row[f"eval/{name}/return"] = r["mean_return"]
            row[f"eval/{name}/perturbation"] = r["mean_perturbation_linf"]
        if result["attacks"]:
            row["eval/robust/return"], row["eval/robust_avg/return"] = (result["robust_return"],
                                                                        result["robust_return_avg"])
        sto = result.get("evaluation_stochastic")
        if sto is not None:
            row["eval_stochastic/clean/return"] = sto["clean_return"]
            row.update({f"eval_stochastic/{k}/return": v for k, v in sto["attack_returns"].items()})
            if sto["attack_returns"]:
                row["eval_stochastic/robust/return"] = sto["robust_return"]
                row["eval_stochastic/robust_avg/return"] = sto["robust_return_avg"]
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)
        self.last = result
        self.history.append({"frames": dm.frames, "step": trainer.global_step, **row})
        return result

    def summary(self, trainer, pl_module) -> dict:
        if self.last is None:
            return {}
        r = self.last
        out = {
            "clean_return": r["clean_return"],
            "attack_returns": dict(r["attack_returns"]),
            "robust_return": r["robust_return"],          # the worst attack (paper: robust)
            "robust_return_avg": r["robust_return_avg"],  # the mean over attacks
            "evaluation": {
                "frames": r["frames"], "eps": r["eps"], "episodes": r["episodes"],
                "deterministic": r["deterministic"], "stochastic": r["stochastic"], "steps": r["steps"],
                "step_size": r["step_size"], "random_start": r["random_start"], "seed": r["seed"],
                "robust_attack": r["robust_attack"],
                "clean_std": r["clean"]["std_return"],
                "attack_std": {k: v["std_return"] for k, v in r["attacks"].items()},
                "perturbation_linf": {k: v["mean_perturbation_linf"] for k, v in r["attacks"].items()},
            },
        }
        for scan in ("rs_scan", "optimal_scan"):
            if scan in r:
                out["evaluation"][scan] = r[scan]
        sto = r.get("evaluation_stochastic")
        if sto is not None:
            out["evaluation_stochastic"] = {"clean_return": sto["clean_return"],
                                            "attack_returns": dict(sto["attack_returns"])}
        return out

    def state_dict(self) -> dict:
        return {"next_at": self.next_at, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.next_at = state["next_at"]
        self.history = list(state["history"])
