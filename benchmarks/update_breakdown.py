"""Where a 64x64 PPO update's time goes: bare PyTorch vs PruneRL's module vs Lightning's loop.

The throughput benchmark times the whole loop; this one takes the update apart, in one process
with one torch thread, on random data with the benchmark recipe's shapes (Hopper: 11 observations,
3 actions, minibatch 64, 64x64 tanh actor and critic, learned log-std, clip 0.5):

- ``bare_per_tensor``: forward, PPO loss, backward, ``clip_grad_norm_(foreach)``, fused Adam over
  the 13 parameter tensors — the floor a hand-written PyTorch loop reaches.
- ``bare_flat``: the same on :class:`prunerl.module.FlatParameters` (one flat parameter and
  gradient buffer), as PruneRL does.
- ``module_step``: ``PPOModule.training_step`` called directly (no Trainer; ``manual_backward`` and
  the optimiser wrapper replaced by their plain PyTorch calls).
- ``lightning_empty_step``: Lightning's manual-optimisation loop around a ``training_step`` that does
  nothing (per step: fetcher, hooks, progress tracking) — what one Lightning step costs by itself.
- ``lightning_trivial_update``: the same loop with a one-parameter ``manual_backward`` +
  ``LightningOptimizer.step``, and ``bare_trivial_update`` the same update without Lightning:
  their difference minus the empty step is the cost of Lightning's backward/step wrappers.

Each figure is the best of ``--repeats`` timings of ``--updates`` updates (after a warm-up);
the variants are interleaved. Writes ``results/update_breakdown.json``.

    python benchmarks/update_breakdown.py [--updates 640] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, machine_info, without_trainer, write_json  # noqa: E402
from prunerl.models import Critic, GaussianActor  # noqa: E402
from prunerl.module import FlatParameters, PPOModule  # noqa: E402
from prunerl.ppo import ppo_loss_terms  # noqa: E402

OBS, ACT, N, MB, CLIP = 11, 3, 2048, 64, 0.5


def _nets():
    torch.manual_seed(0)
    return GaussianActor(OBS, ACT, (64, 64), "tanh", 1.0, learn_std=True), Critic(OBS, (64, 64), "tanh")


def _data():
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(1)
    return TensorDict({"observation": torch.randn(N, OBS, generator=g), "action": torch.randn(N, ACT, generator=g),
                       "sample_log_prob": torch.randn(N, generator=g), "advantage": torch.randn(N, generator=g),
                       "value_target": torch.randn(N, generator=g)}, [N])


def _minibatches(data):
    mbs = [data[i * MB:(i + 1) * MB] for i in range(N // MB)]  # cut once: no TensorDict index per update
    i = 0
    while True:
        yield mbs[i % len(mbs)]
        i += 1


def bare_update(flat: bool):
    actor, critic = _nets()
    if flat:
        fp = FlatParameters([*actor.parameters(), *critic.parameters()])
        params, opt = [fp.param], torch.optim.Adam([fp.param], lr=3e-4, eps=1e-5, fused=True)
    else:
        params = [*actor.parameters(), *critic.parameters()]
        opt = torch.optim.Adam(params, lr=3e-4, eps=1e-5, fused=True)

    def step(mb):
        obs = mb["observation"]
        mean = actor(obs)
        terms = ppo_loss_terms(actor.log_prob(mean, mb["action"]), mb["sample_log_prob"], mb["advantage"],
                               critic(obs), mb["value_target"], 0.2, True, diagnostics=False)
        loss = terms["loss_objective"] + 0.5 * terms["loss_critic"]
        if flat:
            fp.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
    return step


def module_update():
    actor, critic = _nets()
    module = PPOModule(actor, critic, total_updates=10**9, ent_coef=0.0, max_grad_norm=CLIP)
    without_trainer(module)

    def step(mb):
        module.training_step(mb, 0)
        if len(module._step_metrics) > 4096:
            module._step_metrics.clear()
    return step


def time_steps(step, updates: int, data) -> float:
    mbs = _minibatches(data)
    for _ in range(64):
        step(next(mbs))
    t0 = time.perf_counter()
    for _ in range(updates):
        step(next(mbs))
    return (time.perf_counter() - t0) / updates * 1e3


def lightning_steps(updates: int, trivial_update: bool) -> float:
    """ms per step of Lightning's manual-optimisation loop around a (nearly) empty training_step."""
    import lightning as L

    class Empty(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.w = torch.nn.Parameter(torch.zeros(2))

        def __setattr__(self, name, value):  # PruneRL's fast path (PPOModule.__setattr__)
            if name == "_current_fx_name":
                object.__setattr__(self, name, value)
            else:
                super().__setattr__(name, value)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def training_step(self, batch, batch_idx):
            if trivial_update:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(self.w.sum())
                opt.step()

    class Steps:
        def __len__(self):
            return updates

        def __iter__(self):
            x = torch.zeros(1)
            for _ in range(updates):
                yield x

    class Timer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.ms = (time.perf_counter() - self.t0) / updates * 1e3

    timer = Timer()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(Empty(), train_dataloaders=Steps())
    return timer.ms  # the second epoch (the first warms up)


def bare_trivial(updates: int) -> float:
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.0)
    t0 = time.perf_counter()
    for _ in range(updates):
        opt.zero_grad()
        w.sum().backward()
        opt.step()
    return (time.perf_counter() - t0) / updates * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=640)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "update_breakdown.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    data = _data()
    variants = {
        "bare_per_tensor": lambda: time_steps(bare_update(False), args.updates, data),
        "bare_flat": lambda: time_steps(bare_update(True), args.updates, data),
        "module_step": lambda: time_steps(module_update(), args.updates, data),
        "lightning_empty_step": lambda: lightning_steps(args.updates * 4, trivial_update=False),
        "lightning_trivial_update": lambda: lightning_steps(args.updates * 4, trivial_update=True),
        "bare_trivial_update": lambda: bare_trivial(args.updates * 4),
    }
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.repeats):
        for name, fn in variants.items():
            runs[name].append(fn())
        print(f"repeat {rep}: " + "  ".join(f"{k} {v[-1]:.3f}" for k, v in runs.items()), flush=True)
    best = {k: min(v) for k, v in runs.items()}
    best["lightning_backward_step_wrappers"] = (best["lightning_trivial_update"] - best["lightning_empty_step"]
                                                - best["bare_trivial_update"])
    result = {
        "benchmark": "update_breakdown",
        "command": shlex.join(["python", *(sys.argv if argv is None else [__file__, *argv])]),
        "settings": {"obs": OBS, "act": ACT, "minibatch": MB, "hidden": [64, 64], "activation": "tanh",
                     "updates": args.updates, "repeats": args.repeats, "torch_threads": 1,
                     "statistic": "best of repeats, ms per update"},
        "ms_per_update": best,
        "runs": runs,
        "machine": machine_info(),
    }
    write_json(args.out, result)
    for k, v in best.items():
        print(f"{k:34s} {v:7.3f} ms")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
