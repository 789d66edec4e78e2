"""Exported policy size and batch-1 CPU latency: dense vs 50% / 90% neuron-pruned vs 90%
elementwise-pruned Hopper policies (issue 14, item 4).

The policies. One Hopper actor (11-256-256-3 tanh, the default): a trained checkpoint's
(``--checkpoint``; by default the dense κ=0 seed-0 run of the Hopper reproduction, when it is
present) or, failing that, a freshly initialised one with unit normaliser statistics — the
weights' values do not change the cost, only the shapes do. From it, in memory and one-shot:
- ``dense``: as it is;
- ``neuron50`` / ``neuron90``: ``pruning=neuron``'s masks (``prunerl.pruning.neuron_masks``:
  whole hidden units, ranked by incoming × outgoing norm, evenly over the layers) at 50% / 90% of
  the weights, applied to the weights and the removed units' biases;
- ``magnitude90``: ``pruning=magnitude``'s masks (|w|, ERK allocation) at 90% of the weights.
(One-shot masks on trained weights, no fine-tuning: the returns of these policies are not the
point here, their size and speed are; a policy pruned while training has the same shapes.)
Each is exported as ``python -m prunerl export`` does (``prunerl.export.write_policy``: dead units
dropped, normaliser folded in, the written file checked), to ONNX and TorchScript.

What is timed: one call with a single observation (batch 1, float32), one thread everywhere
(``torch.set_num_threads(1)``, onnxruntime intra/inter-op threads 1, OMP/MKL/OpenBLAS 1):
``onnxruntime`` (``InferenceSession.run`` on the .onnx file), ``torchscript`` (``torch.jit.load``
of the .pt file, under ``torch.inference_mode``) and ``torch_eager`` (the compacted nn.Module
itself). Each (runtime, policy) pair is warmed up, then ``--calls`` calls are timed one by one
(``perf_counter_ns``); ``--rounds`` rounds interleave the policies (their order rotating each
round), so background load hurts all alike. Reported: median, 10th and 90th percentiles over all
calls, the per-round medians, and speed-up = dense median / policy median.
Target: ``neuron90`` ≥ 3× faster than ``dense`` at batch 1 (checked per runtime).

At batch 1 a call's fixed cost (Python binding, input/output conversion, the runtime's dispatch)
is a large part of it. To show it, a ``floor`` policy — the same observation in and action out,
with one hidden unit per layer (11-1-1-3) — is timed alongside; ``above_floor_us`` = median −
floor's median is what the network's size costs, and ``speedup_above_floor`` compares those.

    python benchmarks/export_latency.py [--checkpoint PATH] [--calls 2000] [--rounds 7]
                                        [--out benchmarks/results/export_latency.json]
    python benchmarks/export_latency.py --quick     # smoke run: few calls, JSON to a temp file
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, THREAD_VARS, load_average, machine_info, write_json  # noqa: E402

DEFAULT_CHECKPOINT = (REPO / "benchmarks/results/repro_hopper/runs/"
                      "algo.kappa=0.0,pruning.final_sparsity=0.0,seed=0/checkpoints/last.ckpt")
VARIANTS = ("dense", "neuron50", "neuron90", "magnitude90", "floor")
RUNTIMES = ("onnxruntime", "torchscript", "torch_eager")
TARGET = 3.0  # neuron90 vs dense speed-up at batch 1


def base_policy(checkpoint: Path | None):
    """(the dense DeterministicPolicy, where it came from)."""
    import torch

    from prunerl.checkpoint import load_checkpoint
    from prunerl.export import DeterministicPolicy, policy_from_checkpoint
    from prunerl.models import GaussianActor

    if checkpoint is not None and checkpoint.is_file():
        policy, cfg = policy_from_checkpoint(load_checkpoint(checkpoint))
        return policy, {"checkpoint": str(checkpoint), "env_id": cfg["env"]["id"]}
    torch.manual_seed(0)
    actor = GaussianActor(11, 3)  # Hopper-v5: 11 observations, 3 actions; 256-256 tanh
    policy = DeterministicPolicy(torch.zeros(11), torch.ones(11), 10.0, actor.mean_net).eval().requires_grad_(False)
    return policy, {"checkpoint": None, "env_id": "Hopper-v5",
                    "note": f"{checkpoint} not found: a freshly initialised 11-256-256-3 actor (shapes set the cost)"}


def pruned(policy, variant: str):
    """A copy of ``policy`` with its mean network pruned one-shot as ``variant`` says."""
    import copy

    import torch

    from prunerl.pruning import compute_masks, magnitude_scores, neuron_masks

    if variant == "floor":  # one hidden unit per layer: the per-call cost of this input and output
        from prunerl.export import DeterministicPolicy, widths
        from prunerl.models import mlp

        w = widths(policy.mean_net)
        act = "relu" if any(isinstance(m, torch.nn.ReLU) for m in policy.mean_net) else "tanh"
        net = mlp(w[0], w[-1], [1] * (len(w) - 2), act, out_gain=0.01)
        return DeterministicPolicy(policy.obs_mean, policy.obs_std, policy.clip, net).eval().requires_grad_(False)
    out = copy.deepcopy(policy)
    lin = [m for m in out.mean_net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        if variant.startswith("neuron"):
            masks, units = neuron_masks([m.weight for m in lin], int(variant[6:]) / 100)
            for m, u in zip(lin, units):
                m.bias.mul_(u)
        elif variant.startswith("magnitude"):
            names = [str(i) for i in range(len(lin))]
            keep = compute_masks(magnitude_scores({n: m.weight for n, m in zip(names, lin)}),
                                 int(variant[9:]) / 100, "erk")
            masks = [keep[n] for n in names]
        else:
            masks = [torch.ones_like(m.weight, dtype=torch.bool) for m in lin]
        for m, k in zip(lin, masks):
            m.weight.mul_(k)
    return out


def timed_calls(fn, x, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn(x)
    out = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn(x)
        out.append((time.perf_counter_ns() - t0) / 1000.0)  # µs
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="a Hopper .ckpt (default: the repro_hopper dense κ=0 seed-0 run; if missing, fresh weights)")
    p.add_argument("--calls", type=int, default=2000, help="timed calls per (runtime, policy) and round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="smoke run: 50 calls, 1 round, JSON to a temp file")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/export_latency.json")
    p.add_argument("--keep", type=Path, default=None, help="keep the exported files in this directory")
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.rounds, args.warmup = 50, 1, 10
    out_json = args.out or (Path(tempfile.gettempdir()) / "export_latency_quick.json" if args.quick
                            else REPO / "benchmarks/results/export_latency.json")
    for v in THREAD_VARS:
        os.environ[v] = "1"

    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    from prunerl.export import FORMATS, DeterministicPolicy, compact_mlp, write_policy

    torch.set_num_threads(1)
    load_before = load_average()
    base, source = base_policy(args.checkpoint)
    files_dir = args.keep or Path(tempfile.mkdtemp(prefix="export_latency_"))
    files_dir.mkdir(parents=True, exist_ok=True)

    policies, results = {}, {}
    for variant in VARIANTS:
        full = pruned(base, variant)
        entry = {}
        for fmt in FORMATS:
            w = write_policy(full, fmt, files_dir / f"{variant}{FORMATS[fmt]}", {"variant": variant})
            entry[fmt] = {"bytes": w["bytes"], "max_abs_diff": w["max_abs_diff"]}
        entry.update(widths=w["metadata"]["widths"], parameters=w["parameters"],
                     weight_sparsity=w["metadata"]["weight_sparsity"])
        results[variant] = entry

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(str(files_dir / f"{variant}.onnx"), opts, providers=["CPUExecutionProvider"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(files_dir / f"{variant}{FORMATS['torchscript']}"))
        eager = DeterministicPolicy(full.obs_mean, full.obs_std, full.clip, compact_mlp(full.mean_net))

        def run_ort(x, sess=sess):
            return sess.run(["action"], {"observation": x})

        def run_ts(x, m=scripted):
            with torch.inference_mode():
                return m(x)

        def run_eager(x, m=eager):
            with torch.inference_mode():
                return m(x)

        policies[variant] = {"onnxruntime": run_ort, "torchscript": run_ts, "torch_eager": run_eager}

    z = torch.randn(1, base.obs_mean.numel(), generator=torch.Generator().manual_seed(0))
    x_np = (base.obs_mean + base.obs_std * z).numpy().astype(np.float32)  # one plausible raw observation
    inputs = {"onnxruntime": x_np, "torchscript": torch.from_numpy(x_np), "torch_eager": torch.from_numpy(x_np)}
    samples = {rt: {v: [] for v in VARIANTS} for rt in RUNTIMES}
    rounds = {rt: {v: [] for v in VARIANTS} for rt in RUNTIMES}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for rt in RUNTIMES:
            for v in order:
                t = timed_calls(policies[v][rt], inputs[rt], args.calls, args.warmup)
                samples[rt][v] += t
                rounds[rt][v].append(statistics.median(t))

    latency = {}
    for rt in RUNTIMES:
        latency[rt] = {}
        for v in VARIANTS:
            q = np.percentile(samples[rt][v], [10, 50, 90])
            latency[rt][v] = {"median_us": float(q[1]), "p10_us": float(q[0]), "p90_us": float(q[2]),
                              "round_medians_us": rounds[rt][v], "calls": len(samples[rt][v])}
        dense, floor = latency[rt]["dense"]["median_us"], latency[rt]["floor"]["median_us"]
        for v in VARIANTS:
            med = latency[rt][v]["median_us"]
            latency[rt][v]["speedup_vs_dense"] = dense / med
            latency[rt][v]["above_floor_us"] = med - floor
            latency[rt][v]["speedup_above_floor"] = (dense - floor) / (med - floor) if med > floor else None
    target = {rt: {"neuron90_speedup": latency[rt]["neuron90"]["speedup_vs_dense"], "target": TARGET,
                   "met": latency[rt]["neuron90"]["speedup_vs_dense"] >= TARGET} for rt in RUNTIMES}

    result = {
        "what": "exported policy file size and batch-1 single-thread CPU latency, Hopper actor",
        "source": source,
        "variants": {v: {"how": {"dense": "as trained", "neuron50": "pruning=neuron masks, 50% of weights, one-shot",
                                 "neuron90": "pruning=neuron masks, 90% of weights, one-shot",
                                 "magnitude90": "pruning=magnitude masks (ERK), 90% of weights, one-shot",
                                 "floor": "one hidden unit per layer: the fixed per-call cost"}[v],
                         **results[v]} for v in VARIANTS},
        "latency": latency,
        "target": target,
        "quick": args.quick,
        "calls": args.calls, "rounds": args.rounds, "warmup": args.warmup,
        "files": str(files_dir) if args.keep else None,
        "load_average_before": load_before, "load_average_after": load_average(),
        "machine": {**machine_info(), "onnxruntime": ort.__version__},
        "command": " ".join(["python", "benchmarks/export_latency.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
    }
    write_json(out_json, result)

    print(f"source: {source.get('checkpoint') or source.get('note')}")
    print(f"{'policy':<12} {'widths':<16} {'params':>8} {'onnx':>10} {'torchscript':>12}   "
          + "   ".join(f"{rt} µs (×dense)" for rt in RUNTIMES))
    for v in VARIANTS:
        e = results[v]
        cells = "   ".join(f"{latency[rt][v]['median_us']:8.1f} ({latency[rt][v]['speedup_vs_dense']:.2f}×)"
                           for rt in RUNTIMES)
        print(f"{v:<12} {'-'.join(map(str, e['widths'])):<16} {e['parameters']:>8,} {e['onnx']['bytes']:>10,} "
              f"{e['torchscript']['bytes']:>12,}   {cells}")
    for rt in RUNTIMES:
        t, above = target[rt], latency[rt]["neuron90"]["speedup_above_floor"]
        print(f"target neuron90 ≥ {TARGET}× dense, {rt}: {t['neuron90_speedup']:.2f}× — {'met' if t['met'] else 'not met'}"
              f" (above the {latency[rt]['floor']['median_us']:.1f} µs floor: "
              + (f"{above:.2f}×)" if above else "n/a)"))
    print(f"wrote {out_json}" + (" (quick: not figures to report)" if args.quick else ""))
    return result


if __name__ == "__main__":
    main()
