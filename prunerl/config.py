"""Checks on a composed config: every bad value gets one clear error before anything is written.

Errors name the key, the bad value and what is allowed (STYLE.md), e.g.
``algo.kappa=-0.1 is negative; κ must be >= 0 (0 turns SA off)``.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, ListConfig

from prunerl.checkpoint import load_checkpoint
from prunerl.envs import DEFAULT_ENGINE, ENGINES, TASKS
from prunerl.errors import ConfigError  # noqa: F401 — re-exported: `from prunerl.config import ConfigError`

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ConfigError(f"device={device!r} is not allowed; allowed: {list(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for, but CUDA is not available on this machine "
                          f"(torch {torch.__version__}); use device=cpu or device=auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return value


def _number(value, positive: bool = False) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok and (value > 0 if positive else True)


# (key, lowest, lowest allowed?, highest, highest allowed?) — every number fit reads, with its range
NUMBERS = (
    ("algo.lr", 0, False, None, None),
    ("algo.adam_eps", 0, False, None, None), ("algo.gamma", 0, False, 1, True),
    ("algo.gae_lambda", 0, True, 1, True), ("algo.clip", 0, False, None, None),
    ("algo.vf_coef", 0, True, None, None), ("algo.ent_coef", 0, True, None, None),
    ("algo.max_grad_norm", 0, False, None, None), ("algo.model.sigma", 0, False, None, None),
    ("env.clip_obs", 0, False, None, None), ("algo.sa.step_ratio", 0, False, None, None),
    ("algo.sa.eps_ramp", 0, True, 1, True), ("algo.sa.beta_start", 0, True, 1, True),
    ("algo.sa.beta_end", 0, True, 1, True), ("algo.sa.beta_ramp", 0, True, 1, True),
)


def _select(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if node is not None else None
    return node


def _range_text(lo, lo_in, hi, hi_in) -> str:
    left = f">= {lo}" if lo_in else f"> {lo}"
    if hi is None:
        return f"a number {left}"
    return f"a number in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def validate_numbers(cfg: DictConfig) -> None:
    """Types and ranges of the numeric keys (a string where a number belongs is named, not a TypeError)."""
    for key, lo, lo_in, hi, hi_in in NUMBERS:
        v = _select(cfg, key)
        if v is None and key not in ("algo.lr", "algo.gamma"):
            continue
        ok = _number(v) and (v >= lo if lo_in else v > lo) and (hi is None or (v <= hi if hi_in else v < hi))
        if not ok:
            raise ConfigError(f"{key}={v!r} is not allowed; allowed: {_range_text(lo, lo_in, hi, hi_in)}")
    for key in ("algo.kappa", "env.eps", "algo.sa.eps"):   # their sign has its own message below
        v = _select(cfg, key)
        if not (_number(v) or (v is None and key != "algo.kappa")):
            raise ConfigError(f"{key}={v!r} is not allowed; allowed: a number >= 0"
                              + (" (null: the task's ε)" if key == "algo.sa.eps" else ""))
    from prunerl.sa import SA_METHODS

    method = cfg.algo.sa.method
    if method not in SA_METHODS:
        raise ConfigError(f"algo.sa.method={method!r} is not allowed; allowed: {list(SA_METHODS)}")
    steps = cfg.algo.sa.steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"algo.sa.steps={steps!r} must be an integer >= 0 (0: no inner maximisation)")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed!r} must be an integer >= 0")
    hidden = cfg.algo.model.hidden
    if not isinstance(hidden, (list, ListConfig)) or not hidden or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise ConfigError(f"algo.model.hidden={hidden!r} must be a non-empty list of positive integers (layer widths), "
                          "e.g. [256,256]")
    if not isinstance(cfg.algo.model.learn_std, bool):
        raise ConfigError(f"algo.model.learn_std={cfg.algo.model.learn_std!r} must be true or false")
    for key in BOOLEANS:
        _boolean(key, _select(cfg, key))
    r_max = _select(cfg, "env.r_max")
    if r_max is not None and not _number(r_max, positive=True):
        raise ConfigError(f"env.r_max={r_max!r} is not allowed; allowed: a number > 0 (R_max of the certified bound)")


#: the true/false keys fit reads (a string such as ``maybe`` would otherwise be taken as true)
BOOLEANS = ("algo.normalize_advantage", "algo.anneal_lr", "env.scale_reward")


def _boolean(key: str, value) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")


def _nonnegative_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name}={value!r} must be an integer >= 0")
    return value


def validate_fit(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first bad value in a ``fit`` config."""
    env, algo = cfg.env, cfg.algo
    validate_numbers(cfg)
    if env.name not in TASKS:
        raise ConfigError(f"env={env.name!r} is not a known task; allowed: {sorted(TASKS)}")
    if env.id != TASKS[env.name].env_id:
        raise ConfigError(f"env.id={env.id!r} does not match env={env.name} "
                          f"(expected {TASKS[env.name].env_id!r})")
    for name, value in (("env.eps", env.eps), ("algo.sa.eps", algo.sa.eps)):
        if value is not None and value < 0:
            raise ConfigError(f"{name}={value} is negative; ε must be >= 0")
    if algo.kappa < 0:
        raise ConfigError(f"algo.kappa={algo.kappa} is negative; κ must be >= 0 (0 turns SA off)")
    total = _positive_int("total_frames", cfg.total_frames)
    n_envs = _positive_int("env.num_envs", env.num_envs)
    _positive_int("env.threads", env.get("threads", 1))
    if env.get("engine", DEFAULT_ENGINE) not in ENGINES:   # absent in configs written before env.engine
        raise ConfigError(f"env.engine={env.engine!r} is not allowed; allowed: {list(ENGINES)}")
    fpb = _positive_int("algo.frames_per_batch", algo.frames_per_batch)
    mbs = _positive_int("algo.minibatches", algo.minibatches)
    _positive_int("algo.epochs", algo.epochs)
    _positive_int("torch_threads", cfg.torch_threads)
    if fpb % n_envs:
        raise ConfigError(f"algo.frames_per_batch={fpb} is not divisible by env.num_envs={n_envs}; "
                          f"allowed: a multiple of {n_envs}")
    if fpb % mbs:
        raise ConfigError(f"algo.frames_per_batch={fpb} is not divisible by algo.minibatches={mbs}; "
                          "every minibatch must have the same size")
    if total < fpb:
        raise ConfigError(f"total_frames={total} is smaller than one rollout "
                          f"(algo.frames_per_batch={fpb})")
    if algo.sa.steps < 0 or algo.sa.step_ratio <= 0:
        raise ConfigError(f"algo.sa.steps={algo.sa.steps} must be >= 0 and "
                          f"algo.sa.step_ratio={algo.sa.step_ratio} must be > 0")
    if not 0 <= algo.sa.eps_ramp <= 1:
        raise ConfigError(f"algo.sa.eps_ramp={algo.sa.eps_ramp} is outside [0, 1]")
    if algo.model.activation not in ("tanh", "relu"):
        raise ConfigError(f"algo.model.activation={algo.model.activation!r} is not allowed; "
                          "allowed: ['relu', 'tanh']")
    if algo.model.sigma <= 0:
        raise ConfigError(f"algo.model.sigma={algo.model.sigma} must be > 0")
    ck = cfg.checkpoint
    if ck.every_n_rollouts is not None:
        _positive_int("checkpoint.every_n_rollouts", ck.every_n_rollouts)
    if ck.get("every_minutes") is not None and not _number(ck.every_minutes, positive=True):
        raise ConfigError(f"checkpoint.every_minutes={ck.every_minutes!r} must be a number > 0 (null: off)")
    if not _number(ck.get("min_free_mb", 0)) or ck.get("min_free_mb", 0) < 0:
        raise ConfigError(f"checkpoint.min_free_mb={ck.min_free_mb!r} must be a number >= 0")
    if ck.get("requeue", "auto") not in ("auto", False):
        raise ConfigError(f"checkpoint.requeue={ck.requeue!r} is not allowed; allowed: ['auto', false]")
    if cfg.get("pruning") is not None:
        validate_pruning_cfg(cfg.pruning)
    resolve_device(cfg.device)
    if cfg.get("evaluation") is not None:
        validate_attack_settings(cfg.evaluation, prefix="evaluation.")
    lip = (cfg.get("callbacks") or {}).get("lipschitz")
    if lip is not None:
        validate_certificate_cfg(lip)
    if cfg.get("adversary") is not None and cfg.get("victim") is None:
        raise ConfigError("experiment=adversary needs victim=PATH (the checkpoint of the policy to attack)")
    if cfg.get("victim") is not None:
        victim_task = load_checkpoint(cfg.victim, key="victim")["prunerl"]["config"]["env"]["name"]
        if victim_task != env.name:
            raise ConfigError(f"victim={cfg.victim} is a checkpoint of env={victim_task}, "
                              f"but this run is env={env.name}")
        adv_eps = cfg.adversary.eps
        if adv_eps is not None and adv_eps < 0:
            raise ConfigError(f"adversary.eps={adv_eps} is negative; ε must be >= 0")
    if cfg.resume is not None and cfg.resume != "auto":
        ckpt = load_checkpoint(cfg.resume, key="resume")
        task = ckpt["prunerl"]["config"]["env"]["name"]
        if task != env.name:
            raise ConfigError(f"resume={cfg.resume} is a checkpoint of env={task}, "
                              f"but this run is env={env.name}")
        groups = [g for st in ckpt.get("optimizer_states", []) for g in st.get("param_groups", [])]
        if [len(g["params"]) for g in groups] != [1]:
            raise ConfigError(f"resume={cfg.resume} holds optimiser state for "
                              f"{sum(len(g['params']) for g in groups)} parameter tensors; this PruneRL "
                              "keeps one flat parameter buffer (written by an older version?) — "
                              "`evaluate` still reads it, but a run cannot continue from it")
        saved = ckpt["prunerl"]["config"]
        for key in RESUME_MUST_MATCH:
            there, now = _select_dict(saved, key), _select(cfg, key)
            now = list(now) if isinstance(now, ListConfig) else now
            if there != now:
                raise ConfigError(f"resume={cfg.resume} was trained with {key}={there!r}, but this run has "
                                  f"{key}={now!r}; a run continues with the networks, envs and pruning it "
                                  f"started with (set {key}={there!r}, or start a new run)")


#: what a resumed run must share with the checkpoint it continues: the weights' and masks' shapes, the
#: envs whose state travels in it, the mask layout (structured pruning keeps bias masks)
RESUME_MUST_MATCH = ("algo.model.hidden", "algo.model.activation", "algo.model.learn_std", "env.num_envs",
                     "pruning.criterion")


def _select_dict(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def validate_certificate_cfg(lip: DictConfig) -> None:
    """``callbacks.lipschitz.certificates`` and ``.certificate_threshold`` (issue 14), before anything is written."""
    from prunerl.certify import check_certificate_settings

    for key in ("states", "path_states", "every_n_updates", "quadrature_points", "full_every_n_mask_updates"):
        if lip.get(key) is not None:
            _positive_int(f"callbacks.lipschitz.{key}", lip.get(key))
    methods = lip.get("certificates", ["ibp", "crown"])
    if isinstance(methods, ListConfig):
        methods = list(methods)
    try:
        check_certificate_settings(methods, lip.get("certificate_threshold", 0.1), prefix="callbacks.lipschitz.")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_pruning_cfg(p: DictConfig) -> None:
    """The ``pruning`` group: criterion, scope, allocation, final sparsity, burn-in, end, interval."""
    from prunerl.pruning import ALLOCATIONS, CRITERIA, SCOPES, STRUCTURED

    if p.criterion not in CRITERIA:
        raise ConfigError(f"pruning.criterion={p.criterion!r} is not allowed; allowed: {list(CRITERIA)}")
    if p.scope not in SCOPES:
        raise ConfigError(f"pruning.scope={p.scope!r} is not allowed; allowed: {list(SCOPES)}")
    if p.allocation not in ALLOCATIONS:
        raise ConfigError(f"pruning.allocation={p.allocation!r} is not allowed; allowed: {list(ALLOCATIONS)}")
    if p.criterion in STRUCTURED and p.allocation != "layer":
        raise ConfigError(f"pruning.allocation={p.allocation!r} is not allowed with pruning.criterion={p.criterion!r}; "
                          "allowed: ['layer'] (units are removed evenly across the hidden layers)")
    for name in ("final_sparsity", "burn_in", "end"):
        if isinstance(p[name], bool) or not isinstance(p[name], (int, float)):
            raise ConfigError(f"pruning.{name}={p[name]!r} must be a number")
    if not 0 <= p.final_sparsity < 1:
        raise ConfigError(f"pruning.final_sparsity={p.final_sparsity} is outside [0, 1)")
    if not 0 <= p.burn_in < 1:
        raise ConfigError(f"pruning.burn_in={p.burn_in} is outside [0, 1)")
    if not p.burn_in < p.end <= 1:
        raise ConfigError(f"pruning.end={p.end} is outside (pruning.burn_in={p.burn_in}, 1]")
    if isinstance(p.interval, bool) or not isinstance(p.interval, int) or p.interval < 0:
        raise ConfigError(f"pruning.interval={p.interval!r} must be an integer >= 0 (0: one-shot)")


def validate_attack_settings(ev, prefix: str = "") -> None:
    """Attack names, ε, steps and episodes of an evaluation config (``evaluation.*`` or ``evaluate``)."""
    from prunerl.attacks import ATTACKS

    attacks = ev.attacks
    if isinstance(attacks, str) or not all(isinstance(a, str) for a in (attacks or [])):
        raise ConfigError(f"{prefix}attacks={attacks!r} must be a list of attack names; allowed: {list(ATTACKS)}")
    for a in attacks or []:
        if a not in ATTACKS:
            raise ConfigError(f"{prefix}attacks contains {a!r}, which is not an attack; allowed: {list(ATTACKS)}")
    if ev.eps is not None and not _number(ev.eps):
        raise ConfigError(f"{prefix}eps={ev.eps!r} is not allowed; allowed: a number >= 0 (null = the task's ε)")
    if not _number(ev.step_ratio):
        raise ConfigError(f"{prefix}step_ratio={ev.step_ratio!r} is not allowed; allowed: a number > 0")
    if ev.eps is not None and ev.eps < 0:
        raise ConfigError(f"{prefix}eps={ev.eps} is negative; ε must be >= 0 (null = the task's ε)")
    _positive_int(f"{prefix}episodes", ev.episodes)
    if not isinstance(ev.steps, int) or ev.steps < 0:
        raise ConfigError(f"{prefix}steps={ev.steps!r} must be an integer >= 0")
    if not ev.step_ratio > 0:
        raise ConfigError(f"{prefix}step_ratio={ev.step_ratio} must be > 0 (step size = step_ratio · ε)")
    if ev.num_envs is not None:
        _positive_int(f"{prefix}num_envs", ev.num_envs)
    if ev.get("every_frames") is not None:
        _positive_int(f"{prefix}every_frames", ev.every_frames)
    for key in ("stochastic", "deterministic", "random_start"):
        _boolean(f"{prefix}{key}", ev.get(key))
    if ev.get("seed") is not None:
        _nonnegative_int(f"{prefix}seed", ev.seed)
    if ev.get("rs") is not None:
        for key in ("frames", "epochs", "minibatches"):
            _positive_int(f"{prefix}rs.{key}", ev.rs.get(key))
        if not _number(ev.rs.get("lr"), positive=True):
            raise ConfigError(f"{prefix}rs.lr={ev.rs.get('lr')!r} is not allowed; allowed: a number > 0")
        gamma = ev.rs.get("gamma")
        if not (_number(gamma) and 0 < gamma <= 1):
            raise ConfigError(f"{prefix}rs.gamma={gamma!r} is not allowed; allowed: a number in (0, 1]")
        hidden = ev.rs.get("hidden")
        if not isinstance(hidden, (list, ListConfig)) or not hidden or not all(
                isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise ConfigError(f"{prefix}rs.hidden={hidden!r} must be a non-empty list of positive integers "
                              "(layer widths), e.g. [64,64]")
    scan = ev.rs.get("scan") if ev.get("rs") is not None else None
    pairs_ok = isinstance(scan, (list, ListConfig)) and len(scan) > 0 and all(
        isinstance(p, (list, ListConfig)) and len(p) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in p) for p in scan)
    if not pairs_ok:
        raise ConfigError(f"{prefix}rs.scan={scan!r} must be a non-empty list of [ε_Q, reg] pairs of numbers >= 0 "
                          "(e.g. [[0.02, 0.1], [0.05, 1.0]])")
    if ev.get("optimal") is not None:
        _positive_int(f"{prefix}optimal.frames", ev.optimal.frames)
        seeds = ev.optimal.get("seeds")
        if not isinstance(seeds, (list, ListConfig)) or not seeds or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise ConfigError(f"{prefix}optimal.seeds={seeds!r} must be a non-empty list of integers (e.g. [0, 1, 2])")
        if not isinstance(ev.optimal.similarity, (int, float)) or ev.optimal.similarity < 0:
            raise ConfigError(f"{prefix}optimal.similarity={ev.optimal.similarity!r} must be a number >= 0")
