"""The learned adversary's training curve (``experiment=adversary``; paper App. D).

Once per rollout it logs ``adversary/victim_return``: the mean return of the *victim* over the
episodes that ended in this rollout while the adversary perturbed it (its own return,
``train/episode_return``, is −victim return − the similarity penalty, unscaled). At the
end of ``fit`` it writes ``adversary_curve.png`` in the run directory: the victim's return and the
adversary's return against frames — whether the adversary has learned (the victim's return falls)
or still needs frames. Episodes during training use the adversary's *sampled* perturbations; the
evaluated attack uses its mean, which is usually stronger.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np

from prunerl import atomic
from prunerl.adversary import AdversaryEnv


class AdversaryCurve(L.Callback):
    def __init__(self, filename: str = "adversary_curve.png"):
        super().__init__()
        self.filename = filename
        self.curve: list[dict] = []  # one row per rollout with finished episodes

    @staticmethod
    def _env(trainer) -> AdversaryEnv | None:
        env = getattr(trainer.datamodule, "env", None)
        base = getattr(env, "base_env", env)
        return base if isinstance(base, AdversaryEnv) else None

    def on_train_epoch_end(self, trainer, pl_module):
        env = self._env(trainer)
        if env is None or not env.finished_victim_returns:
            return
        returns, env.finished_victim_returns = env.finished_victim_returns, []
        dm = trainer.datamodule
        row = {"frames": dm.frames, "victim_return": float(np.mean(returns)), "episodes": len(returns),
               "adversary_return": dm.train_return}
        self.curve.append(row)
        rows = getattr(pl_module, "rollout_metrics", None)
        if rows is not None:
            rows["adversary/victim_return"] = row["victim_return"]
            rows["adversary/victim_episodes"] = float(row["episodes"])

    def on_train_end(self, trainer, pl_module):
        if self.curve:
            write_curve(self.curve, Path(trainer.default_root_dir) / self.filename)

    def summary(self, trainer, pl_module) -> dict:
        """The last rollouts' victim return (mean over the last 5 rows) for ``summary.json``."""
        tail = self.curve[-5:]
        return {"adversary_victim_return": float(np.mean([r["victim_return"] for r in tail])) if tail else None}

    def state_dict(self) -> dict:
        return {"curve": self.curve}

    def load_state_dict(self, state: dict) -> None:
        self.curve = list(state["curve"])


def write_curve(curve: list[dict], path: Path) -> Path:
    """Plot the victim's and the adversary's return against frames into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [r["frames"] for r in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(frames, [r["victim_return"] for r in curve], label="victim return (per rollout)")
    ax.plot(frames, [r["adversary_return"] for r in curve], label="adversary return (recent episodes)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("adversary training frames")
    ax.set_ylabel("episode return")
    ax.set_title("learned adversary: training curve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic.savefig(fig, path, dpi=100)
    plt.close(fig)
    return path
