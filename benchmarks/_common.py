"""Shared parts of the benchmarks: identical PPO settings for PruneRL and SB3, timers, machine info.

Both sides run the same recipe (SB3's PPO defaults): 2048 frames per rollout, 10 epochs,
minibatch 64 (32 minibatches), 64x64 tanh MLPs for actor and critic, a learned state-independent
log-std starting at 0, lr 3e-4, γ 0.99, GAE λ 0.95, clip 0.2, entropy coefficient 0,
value coefficient 0.5, gradient-norm clip 0.5, advantage normalisation per minibatch.
Each side runs in its own process with one torch thread.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRAMES_PER_BATCH = 2048
EPOCHS = 10
MINIBATCH = 64
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def single_thread_env() -> dict[str, str]:
    """The environment a benchmark subprocess runs in: one BLAS/OpenMP thread."""
    env = dict(os.environ)
    env.update({v: "1" for v in THREAD_VARS})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("WANDB_MODE", "disabled")
    return env


def ensure_sb3() -> str:
    """Import Stable-Baselines3, installing it from the package index (by name) if it is missing."""
    try:
        import stable_baselines3
    except ImportError:
        print("stable-baselines3 is missing; installing it with pip ...", file=sys.stderr, flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "stable-baselines3"])
        import stable_baselines3
    return stable_baselines3.__version__


def prunerl_overrides(*, kappa: float, num_envs: int, total_frames: int, seed: int, run_dir: str,
                      extra: list[str] = ()) -> list[str]:
    """Hydra overrides that give PruneRL the SB3-default PPO recipe above."""
    return [
        "env=hopper",
        f"env.num_envs={num_envs}",
        f"algo.frames_per_batch={FRAMES_PER_BATCH}",
        f"algo.epochs={EPOCHS}",
        f"algo.minibatches={FRAMES_PER_BATCH // MINIBATCH}",
        f"algo.kappa={kappa}",
        "algo.sa.steps=10",          # issue 11's κ = 0.3 target is for the 10-step SA loop (SA-PPO's),
        "algo.sa.step_ratio=0.1",    # not the CPU default's 5 steps of ε/5
        "algo.model.hidden=[64,64]",
        "algo.model.activation=tanh",
        "algo.model.learn_std=true",
        "algo.model.sigma=1.0",      # log-std 0 at the start, as SB3
        "algo.ent_coef=0.0",
        "algo.lr=3e-4",
        "algo.gamma=0.99",
        "algo.gae_lambda=0.95",
        "algo.clip=0.2",
        "algo.vf_coef=0.5",
        "algo.max_grad_norm=0.5",
        f"total_frames={total_frames}",
        f"seed={seed}",
        "torch_threads=1",
        "device=cpu",
        "logger=none",
        # plain PPO, as SB3: no pruning, no Lipschitz tracking, no end-of-run attack evaluation
        "pruning=none",
        "callbacks.pruning=null",
        "callbacks.lipschitz=null",
        "callbacks.evaluation=null",
        "callbacks.progress=null",
        f"run_dir={run_dir}",
        *extra,
    ]


def compose_prunerl(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def sb3_ppo(env, seed: int, verbose: int = 0):
    """SB3's PPO with the recipe above (these are SB3's defaults, spelled out)."""
    import torch
    from stable_baselines3 import PPO

    return PPO(
        "MlpPolicy", env, learning_rate=3e-4, n_steps=FRAMES_PER_BATCH, batch_size=MINIBATCH,
        n_epochs=EPOCHS, gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5,
        max_grad_norm=0.5, normalize_advantage=True,
        policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh,
                           log_std_init=0.0, ortho_init=True),
        device="cpu", seed=seed, verbose=verbose,
    )


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "torchrl", "tensordict", "lightning", "gymnasium", "mujoco",
                 "stable_baselines3", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - informational only
            out[name] = None
    return out


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "versions": versions(),
    }
    try:
        model = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        info["cpu_model"] = model[0] if model else None
    except OSError:
        info["cpu_model"] = None
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        pass
    return info


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def write_json(path: Path, obj) -> None:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class Stopwatch:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def without_trainer(module):
    """A PPOModule made to step without a Lightning Trainer: its optimiser configured, and
    ``optimizers()`` / ``manual_backward`` replaced by what Lightning forwards them to."""
    opt = module.configure_optimizers()

    class _Opt:  # what LightningOptimizer forwards to, without the Trainer
        optimizer = opt
        step = staticmethod(opt.step)

    module.optimizers = lambda: _Opt
    module.manual_backward = lambda loss: loss.backward()
    return module


def training_step_timer(module, batches: list):
    """A function timing ``n`` of ``module``'s training steps (ms per step), continuing over
    ``batches`` from call to call; the per-rollout metric buffers are cleared after each call."""
    state = {"i": 0}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            module.training_step(batches[state["i"] % len(batches)], state["i"])
            state["i"] += 1
        dt = time.perf_counter() - t0
        module._step_metrics.clear()
        module._log_ratios.clear()
        return dt / n * 1e3
    return run


def interleaved_runs(timers: dict, *, warmup: int, repeats: int, calls: int, digits: int = 2) -> dict[str, list[float]]:
    """Warm every timer up (``warmup`` calls), then ``repeats`` rounds in which each timer times
    ``calls`` calls, in an order that rotates with the round (background load hurts all alike).
    ``timers``: name -> function(n) returning ms per call. Returns name -> the per-round figures."""
    for fn in timers.values():
        fn(warmup)
    runs: dict[str, list[float]] = {k: [] for k in timers}
    names = list(timers)
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(timers[name](calls))
        print(f"repeat {rep}: " + "  ".join(f"{n} {v[-1]:.{digits}f}" for n, v in runs.items()), flush=True)
    return runs
