"""``python -m prunerl export checkpoint=PATH [format=onnx|torchscript] [out=PATH]``: the
deterministic policy μ(s) of a checkpoint as one self-contained file.

The file maps a *raw* observation batch ``[batch, obs_dim]`` (float32) to the mean action μ(s)
``[batch, act_dim]``: the frozen observation normaliser is folded in, in the order training used
(``prunerl.envs.RunningNormalizer``: normalise with the checkpoint's running mean and std, clip to
±``env.clip_obs``), then the actor's mean MLP. μ(s) is not clipped to the action bounds (the
environment does that, as in training and evaluation).

Size. Hidden units that cannot influence the output are dropped from the matrices
(:func:`compact_mlp`): a unit whose outgoing column is all zero, or whose incoming row and bias are
all zero (tanh(0) = ReLU(0) = 0). Neuron pruning (``pruning=neuron``) removes whole units, so its
policies come out physically smaller; elementwise pruning scatters zeros over the matrices and its
policies stay dense — the zeros are stored and multiplied like any other weight (REFERENCE.md:
sparse kernels do not pay off at this size on a CPU).

Formats. ``onnx``: the graph is written directly with ``onnx.helper`` (Sub, Div, Clip, then Gemm
and Tanh/Relu per layer; opset 17, IR 8, weights inside the file, batch dimension dynamic) — the
policy is this fixed chain of ops, and torch 2.13's ``torch.onnx.export`` would either need
``onnxscript`` and ~7 s per export (its default, dynamo exporter, which writes weights to a second
file unless told not to) or the legacy exporter, which warns that it will be removed.
``torchscript``: ``torch.jit.script`` of the same torch module (deprecated in torch 2.13 in favour
of ``torch.export``, still loadable with ``torch.jit.load``; its warnings are silenced here).
Each file also carries a ``prunerl`` JSON entry (ONNX metadata / TorchScript extra file) saying what
it holds.

Before a file appears under its name it is checked: the written file is run (onnxruntime, when
installed, or ``torch.jit.load``) on ``check_states`` states and must match the in-process policy
within 1e-5; the write is atomic (``prunerl.atomic``). (onnxruntime's tanh is an approximation,
~2.5e-7 from the exact value where torch's is ~3e-8, so on a trained Hopper policy, whose μ reaches
~6, ONNX and torch differ by a few 1e-6.) Bad input — no or a missing checkpoint, an
unknown format, an unreadable checkpoint, an unwritable ``out`` — is a one-line
:class:`~prunerl.errors.ConfigError` (exit 2) raised before anything is written.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from prunerl.atomic import atomic_path
from prunerl.checkpoint import actor_from_checkpoint, frozen_normalizer, load_checkpoint
from prunerl.errors import ConfigError

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}  # format -> default suffix
ONNX_OPSET, ONNX_IR = 17, 8
TOLERANCE = 1e-5  # max |exported − in-process| a written file must meet
METADATA_KEY = "prunerl"
_ONNX_ACT = {nn.Tanh: "Tanh", nn.ReLU: "Relu"}  # activations with σ(0) = 0 (compact_mlp relies on it)


class DeterministicPolicy(nn.Module):
    """μ(s) on raw observations: clip((s − mean)/std, ±clip), then the mean MLP."""

    def __init__(self, obs_mean: torch.Tensor, obs_std: torch.Tensor, clip: float, mean_net: nn.Sequential):
        super().__init__()
        self.register_buffer("obs_mean", obs_mean.detach().to(torch.float32).clone())
        self.register_buffer("obs_std", obs_std.detach().to(torch.float32).clone())
        self.clip = float(clip)
        self.mean_net = mean_net

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        z = ((observation - self.obs_mean) / self.obs_std).clamp(-self.clip, self.clip)
        return self.mean_net(z)


def policy_from_checkpoint(ckpt: dict) -> tuple[DeterministicPolicy, dict]:
    """(the checkpoint's μ(s) with its frozen normaliser folded in, the run's config)."""
    actor, norm_state, cfg = actor_from_checkpoint(ckpt)
    norm = frozen_normalizer(norm_state, clip=float(cfg["env"].get("clip_obs", 10.0)))
    # the same float32 constants RunningNormalizer.normalize computes (std from the float64 variance)
    std = (norm.obs_var + norm.eps).sqrt()
    policy = DeterministicPolicy(norm.obs_mean, std, norm.clip, actor.mean_net)
    return policy.eval().requires_grad_(False), cfg


def _linears(seq: nn.Sequential) -> list[nn.Linear]:
    for m in seq:
        if not isinstance(m, nn.Linear) and type(m) not in _ONNX_ACT:
            raise ValueError(f"cannot export a {type(m).__name__} layer; allowed: Linear, Tanh, ReLU")
    return [m for m in seq if isinstance(m, nn.Linear)]


@torch.no_grad()
def live_units(seq: nn.Sequential) -> list[torch.Tensor]:
    """Keep-vectors of the hidden units of an MLP (Linear, Tanh/ReLU, …, Linear) that can reach
    the output: a unit goes if its outgoing column is all zero (among the next layer's live units)
    or its incoming row (among the previous layer's live units) and its bias are all zero; repeated
    until nothing changes (removing units can strand others). Each layer keeps at least one."""
    lin = _linears(seq)
    keep = [torch.ones(m.out_features, dtype=torch.bool) for m in lin[:-1]]
    changed = True
    while changed:
        changed = False
        for ell, k in enumerate(keep):
            w, b = lin[ell].weight.cpu(), lin[ell].bias.cpu()
            cols = keep[ell - 1] if ell > 0 else torch.ones(w.shape[1], dtype=torch.bool)
            nxt = lin[ell + 1].weight.cpu()
            rows_next = keep[ell + 1] if ell + 1 < len(keep) else torch.ones(nxt.shape[0], dtype=torch.bool)
            silent = (w[:, cols] == 0).all(1) & (b == 0)
            unheard = (nxt[rows_next] == 0).all(0)
            new = k & ~(silent | unheard)
            if not new.any():  # a layer of width 0 is no MLP: keep one (zero-contribution) unit
                new[int(k.nonzero()[0])] = True
            if not torch.equal(new, k):
                keep[ell], changed = new, True
    return keep


@torch.no_grad()
def compact_mlp(seq: nn.Sequential) -> nn.Sequential:
    """The same function with the dead hidden units (:func:`live_units`) dropped from the matrices."""
    lin = _linears(seq)
    keep = live_units(seq)
    layers: list[nn.Module] = []
    i = 0
    for m in seq:
        if isinstance(m, nn.Linear):
            rows = keep[i] if i < len(keep) else torch.ones(m.out_features, dtype=torch.bool)
            cols = keep[i - 1] if i > 0 else torch.ones(m.in_features, dtype=torch.bool)
            new = nn.Linear(int(cols.sum()), int(rows.sum()))
            new.weight.copy_(m.weight.detach().cpu()[rows][:, cols])
            new.bias.copy_(m.bias.detach().cpu()[rows])
            layers.append(new)
            i += 1
        else:
            layers.append(type(m)())
    assert i == len(lin)
    return nn.Sequential(*layers).eval().requires_grad_(False)


def widths(seq: nn.Sequential) -> list[int]:
    """[in, hidden…, out] of an MLP."""
    lin = _linears(seq)
    return [lin[0].in_features, *[m.out_features for m in lin]]


def parameter_count(seq: nn.Sequential) -> int:
    return sum(p.numel() for p in seq.parameters())


# -- writers -----------------------------------------------------------------------------------
def onnx_model(policy: DeterministicPolicy, metadata: dict):
    """The policy as an ONNX ModelProto: Sub, Div, Clip, then Gemm (+ Tanh/Relu) per layer."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, t):
        return numpy_helper.from_array(np.asarray(t.detach().cpu().numpy() if torch.is_tensor(t) else t,
                                                  dtype=np.float32), name)

    inits = [const("obs_mean", policy.obs_mean), const("obs_std", policy.obs_std),
             const("clip_min", np.float32(-policy.clip)), const("clip_max", np.float32(policy.clip))]
    nodes = [helper.make_node("Sub", ["observation", "obs_mean"], ["centred"]),
             helper.make_node("Div", ["centred", "obs_std"], ["scaled"]),
             helper.make_node("Clip", ["scaled", "clip_min", "clip_max"], ["h0"])]
    x, mods = "h0", list(policy.mean_net)
    for k, m in enumerate(mods):
        y = "action" if k == len(mods) - 1 else f"h{k + 1}"
        if isinstance(m, nn.Linear):
            inits += [const(f"W{k}", m.weight), const(f"b{k}", m.bias)]
            nodes.append(helper.make_node("Gemm", [x, f"W{k}", f"b{k}"], [y], transB=1))  # x·Wᵀ + b
        else:
            nodes.append(helper.make_node(_ONNX_ACT[type(m)], [x], [y]))
        x = y
    w = widths(policy.mean_net)
    graph = helper.make_graph(
        nodes, "prunerl_deterministic_policy",
        [helper.make_tensor_value_info("observation", TensorProto.FLOAT, ["batch", w[0]])],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", w[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="prunerl")
    model.ir_version = ONNX_IR
    helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
    onnx.checker.check_model(model)
    return model


def write_onnx(policy: DeterministicPolicy, path: Path, metadata: dict) -> None:
    path.write_bytes(onnx_model(policy, metadata).SerializeToString())


def write_torchscript(policy: DeterministicPolicy, path: Path, metadata: dict) -> None:
    with warnings.catch_warnings():  # torch 2.13: "torch.jit.* is deprecated" (it still works)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(policy), str(path), _extra_files={METADATA_KEY + ".json": json.dumps(metadata)})


def run_file(path: Path, fmt: str, states: torch.Tensor) -> torch.Tensor | None:
    """μ of ``states`` as the written file computes it (onnxruntime, single thread, or
    ``torch.jit.load``); None for ONNX when onnxruntime is not installed."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(["action"], {"observation": states.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            return torch.jit.load(str(path), map_location="cpu")(states)


def check_states(policy: DeterministicPolicy, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` raw observations around the normaliser's statistics, a few far enough out to clip."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, policy.obs_mean.numel(), generator=g) * 3.0
    z[: max(1, n // 16)] *= 6.0  # beyond ±clip_obs after normalisation
    return policy.obs_mean + policy.obs_std * z


# -- the command -------------------------------------------------------------------------------
def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def resolve_out(checkpoint: Path, out, fmt: str) -> Path:
    """Where the file goes: ``out``, inside ``out`` if it is a directory, or beside the checkpoint
    (``<stem>.onnx`` / ``<stem>.torchscript.pt``). ConfigError if it cannot be written there."""
    name = checkpoint.stem + FORMATS[fmt]
    if out is None:
        path = checkpoint.parent / name
    else:
        path = Path(str(out)).expanduser()
        if path.is_dir() or str(out).endswith(os.sep):
            path = path / name
    if path.exists() and path.resolve() == checkpoint.resolve():
        raise ConfigError(f"out={out} is the checkpoint itself; allowed: another file path or a directory")
    if path.exists() and not path.is_file():
        raise ConfigError(f"out={out}: {path} exists and is not a file; allowed: a file path or a directory")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ConfigError(f"out={out}: {base} is a file, not a directory; allowed: a path in a writable directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"out={out}: directory {base} is not writable; allowed: a path in a writable directory")
    return path


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def write_policy(full: DeterministicPolicy, fmt: str, out: Path, metadata: dict | None = None, *,
                 n_check: int = 256) -> dict:
    """Write ``full`` (compacted: :func:`compact_mlp`) to ``out`` as ``fmt``, checked against ``full``
    on ``n_check`` states before it is renamed into place; what was written."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not allowed; allowed: {list(FORMATS)}")
    small = DeterministicPolicy(full.obs_mean, full.obs_std, full.clip, compact_mlp(full.mean_net))
    lin = _linears(full.mean_net)
    meta = {**(metadata or {}), "clip_obs": full.clip, "widths_checkpoint": widths(full.mean_net),
            "widths": widths(small.mean_net),
            "weight_sparsity": sum(int((m.weight == 0).sum()) for m in lin) / sum(m.weight.numel() for m in lin)}
    states = check_states(full, n_check)
    with torch.no_grad():
        reference = full(states)
    writer = write_onnx if fmt == "onnx" else write_torchscript
    with atomic_path(out, keep_suffix=True) as tmp:
        writer(small, tmp, meta)
        got = run_file(tmp, fmt, states)
        err = None if got is None else float((got - reference).abs().max())
        if err is not None and not err <= TOLERANCE:
            raise RuntimeError(f"the written {fmt} policy differs from the in-process one by {err:.3g} "
                               f"(> {TOLERANCE}); nothing was written")
    return {"path": str(out), "format": fmt, "bytes": out.stat().st_size, "metadata": meta,
            "parameters_checkpoint": parameter_count(full.mean_net), "parameters": parameter_count(small.mean_net),
            "max_abs_diff": err, "checked_on": n_check, "checker": None if got is None else
            ("onnxruntime" if fmt == "onnx" else "torch.jit.load")}


def export_policy(ckpt: dict, fmt: str, out: Path, *, source: str = "", n_check: int = 256) -> dict:
    """Write a loaded checkpoint's μ(s) to ``out`` (:func:`write_policy`)."""
    full, cfg = policy_from_checkpoint(ckpt)
    pruning = cfg.get("pruning") or {}
    env = cfg.get("env") or {}
    meta = {
        "what": "deterministic policy mu(s): raw observation [batch, obs_dim] float32 -> mean action "
                "[batch, act_dim]; normalise with obs_mean/obs_std, clip to +-clip_obs, then the MLP; "
                "actions are not clipped to the action bounds",
        "checkpoint": source, "env": env.get("name"), "env_id": env.get("id"),
        "frames": ckpt["prunerl"].get("frames"), "activation": cfg["algo"]["model"]["activation"],
        "pruning": {"criterion": pruning.get("criterion"), "final_sparsity": pruning.get("final_sparsity")},
    }
    return write_policy(full, fmt, out, meta, n_check=n_check)


def export(cfg) -> dict:
    """The ``export`` command: validate everything, then write one file and say what it holds."""
    fmt = cfg.format
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not allowed; allowed: {list(FORMATS)}")
    if cfg.checkpoint is None:
        raise ConfigError("checkpoint=PATH is required (a .ckpt written by `python -m prunerl fit`)")
    n_check = cfg.check_states
    if isinstance(n_check, bool) or not isinstance(n_check, int) or n_check <= 0:
        raise ConfigError(f"check_states={n_check!r} must be a positive integer")
    ckpt_path = Path(str(cfg.checkpoint)).expanduser()
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise ConfigError("format=onnx needs the `onnx` package: pip install 'prunerl[export]' "
                              "(or format=torchscript)") from None
    ckpt = load_checkpoint(cfg.checkpoint)
    if not any(k.startswith("actor.mean_net.") for k in ckpt["state_dict"]):
        raise ConfigError(f"checkpoint={cfg.checkpoint} holds no actor (no actor.mean_net.* weights); "
                          "expected a .ckpt written by `python -m prunerl fit`")
    out = resolve_out(ckpt_path, cfg.out, fmt)
    try:
        result = export_policy(ckpt, fmt, out, source=str(ckpt_path), n_check=n_check)
    except OSError as e:
        raise ConfigError(f"out={cfg.out if cfg.out is not None else out} could not be written "
                          f"({type(e).__name__}: {e.strerror or e}); allowed: a path in a writable directory") from None
    meta = result["metadata"]
    sp = meta["pruning"]
    method = sp["criterion"] or "none"
    pruned = f", pruning={method} {sp['final_sparsity']:g}" if method != "none" and sp["final_sparsity"] else ""
    frames = f", {meta['frames']:,} frames" if isinstance(meta["frames"], int) else ""
    w0, w1 = meta["widths_checkpoint"], meta["widths"]
    layout = ("units removed: " + " + ".join(str(a - b) for a, b in zip(w0[1:-1], w1[1:-1]))
              if w0 != w1 else "no unit removed")
    if w0 == w1 and meta["weight_sparsity"] > 0:
        layout += " — elementwise zeros are stored dense"
    check = (f"max |{result['checker']} − torch| = {result['max_abs_diff']:.2g} on {n_check} states"
             if result["checker"] else "not run (onnxruntime is not installed: pip install 'prunerl[export]')")
    print(f"exported μ(s) of {ckpt_path} ({meta['env_id']}{frames}{pruned})\n"
          f"  network     {'-'.join(map(str, w0))} -> {'-'.join(map(str, w1))} ({layout}; "
          f"{meta['weight_sparsity']:.1%} of the checkpoint's weights are zero)\n"
          f"  parameters  {result['parameters_checkpoint']:,} -> {result['parameters']:,}\n"
          f"  size        {_human(result['bytes'])} ({fmt}); checkpoint {_human(ckpt_path.stat().st_size)}\n"
          f"  check       {check}\n"
          f"  wrote       {out}", flush=True)
    return result
